"""EMA of adapter weights: hand-computed averages, warmup ramp, swap/copy_to, exact resume."""
import pytest
import torch

from trainer.training.ema import AdapterEMA


def params():
    return [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.ones(4))]


def set_all(ps, value):
    with torch.no_grad():
        for p in ps:
            p.fill_(value)


def test_updates_match_hand_computed_average_without_warmup():
    ps = params()
    ema = AdapterEMA(ps, decay=0.9, warmup=False)
    set_all(ps, 1.0)
    ema.update()  # 0.9 * 0 + 0.1 * 1 = 0.1 (first tensor); 0.9 * 1 + 0.1 * 1 = 1 (second)
    set_all(ps, 2.0)
    ema.update()  # 0.9 * 0.1 + 0.1 * 2 = 0.29
    torch.testing.assert_close(ema.shadow[0], torch.full((2, 3), 0.29))
    torch.testing.assert_close(ema.shadow[1], torch.full((4,), 0.9 * 1.0 + 0.1 * 2.0))
    assert ema.num_updates == 2


def test_warmup_ramps_the_decay():
    ps = params()
    ema = AdapterEMA(ps, decay=0.999)
    assert ema.current_decay() == pytest.approx(0.1)
    set_all(ps, 1.0)
    ema.update()  # decay 0.1: 0.1 * 0 + 0.9 * 1
    assert ema.current_decay() == pytest.approx(2 / 11)
    set_all(ps, 3.0)
    ema.update()  # decay 2/11: 2/11 * 0.9 + 9/11 * 3
    torch.testing.assert_close(ema.shadow[0], torch.full((2, 3), 2 / 11 * 0.9 + 9 / 11 * 3.0))
    ema.num_updates = 100_000
    assert ema.current_decay() == 0.999


def test_shadows_are_fp32_copies_and_params_untouched_by_update():
    p = torch.nn.Parameter(torch.full((3,), 0.5, dtype=torch.bfloat16))
    ema = AdapterEMA([p], decay=0.5, warmup=False)
    assert ema.shadow[0].dtype == torch.float32 and ema.shadow[0].data_ptr() != p.data_ptr()
    with torch.no_grad():
        p.fill_(1.5)
    ema.update()
    assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), torch.full((3,), 1.5, dtype=torch.bfloat16))
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 1.0))


def test_swap_uses_averaged_weights_and_restores_even_on_error():
    ps = params()
    ema = AdapterEMA(ps, decay=0.5, warmup=False)
    set_all(ps, 4.0)
    ema.update()  # shadows 2.0 and 2.5
    with ema.swap():
        assert torch.equal(ps[0].detach(), torch.full((2, 3), 2.0))
        assert torch.equal(ps[1].detach(), torch.full((4,), 2.5))
    assert torch.equal(ps[0].detach(), torch.full((2, 3), 4.0))
    with pytest.raises(RuntimeError):
        with ema.swap():
            raise RuntimeError("preview failed")
    assert torch.equal(ps[1].detach(), torch.full((4,), 4.0))
    other = params()
    ema.copy_to(other)
    assert torch.equal(other[0].detach(), torch.full((2, 3), 2.0))
    with pytest.raises(ValueError):
        ema.copy_to(other[:1])


def test_state_dict_round_trip_gives_identical_updates():
    g = torch.Generator().manual_seed(0)
    ps = params()
    ema = AdapterEMA(ps, decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            for p in ps:
                p.add_(torch.randn(p.shape, generator=g))
        ema.update()
    state = ema.state_dict()
    resumed = AdapterEMA(ps, decay=0.5, warmup=False)  # settings come from the state, not the constructor
    resumed.load_state_dict(state)
    for _ in range(3):
        with torch.no_grad():
            for p in ps:
                p.add_(torch.randn(p.shape, generator=g))
        ema.update()
        resumed.update()
        for a, b in zip(ema.shadow, resumed.shadow):
            assert torch.equal(a, b)
    snapshot = ema.state_dict()
    snapshot["shadow"][0].add_(1.0)  # the state is a copy, not a view of the live shadows
    assert not torch.equal(snapshot["shadow"][0], ema.shadow[0])


def test_mismatched_state_and_bad_decay_are_rejected():
    ema = AdapterEMA(params(), decay=0.9)
    with pytest.raises(ValueError, match="another network configuration"):
        ema.load_state_dict(AdapterEMA([torch.nn.Parameter(torch.zeros(5))], decay=0.9).state_dict())
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="decay"):
            AdapterEMA(params(), decay=bad)
