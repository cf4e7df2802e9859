"""Optimizers, LR schedules, gradient clipping and optimizer-memory estimates."""
import dataclasses
import sys
import types

import pytest
import torch

from trainer.config import OptimizerConfig
from trainer.errors import ConfigError
from trainer.training import optim


def quadratic_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(16, 32, generator=g)), torch.nn.Parameter(torch.randn(32, 16, generator=g))]


def quadratic_loss(params):
    return sum((p ** 2).sum() for p in params)


def run(optimizer, params, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        quadratic_loss(params).backward()
        optimizer.step()
    return quadratic_loss(params).item()


def test_adamw_matches_torch_reference_and_hand_formula():
    cfg = OptimizerConfig(learning_rate=1e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6)
    ours, ref = quadratic_params(), quadratic_params()
    opt = optim.build_optimizer([{"params": ours}], cfg, "cpu")
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6, foreach=False)
    start = ours[0].detach().clone()
    run(opt, ours, 1)
    # first AdamW step: p -= lr*wd*p, then p -= lr * g / (|g| + eps) (bias-corrected moments are g and g**2)
    g = 2 * start
    expected = start * (1 - 1e-2 * 0.1) - 1e-2 * g / (g.abs() + 1e-6)
    torch.testing.assert_close(ours[0].detach(), expected)
    run(opt, ours, 19)
    run(ref_opt, ref, 20)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_param_groups_keep_their_own_lr():
    unet, te = quadratic_params(0), quadratic_params(1)
    opt = optim.build_optimizer([{"params": unet}, {"params": te, "lr": 1e-5}], OptimizerConfig(learning_rate=1e-4),
                                "cpu")
    assert [grp["lr"] for grp in opt.param_groups] == [1e-4, 1e-5]
    sched = optim.build_lr_scheduler(opt, OptimizerConfig(scheduler="cosine"), 10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert sched.get_last_lr() == pytest.approx([0.5e-4, 0.5e-5])


@pytest.mark.parametrize("name, lr, steps", [("adafactor", 0.05, 60), ("sgd", 0.05, 30), ("adamw", 0.05, 60)])
def test_optimizers_reduce_a_quadratic(name, lr, steps):
    params = quadratic_params()
    before = quadratic_loss(params).item()
    opt = optim.build_optimizer([{"params": params}], OptimizerConfig(name=name, learning_rate=lr), "cpu")
    assert run(opt, params, steps) < 0.2 * before


def test_adafactor_uses_configured_lr_and_moves_zero_initialised_weights():
    p = torch.nn.Parameter(torch.zeros(8, 4))  # a LoRA "up" matrix starts at zero
    opt = optim.build_optimizer([{"params": [p]}], OptimizerConfig(name="adafactor", learning_rate=1e-3,
                                                                   weight_decay=0.0), "cpu")
    assert opt.defaults["relative_step"] is False and opt.defaults["scale_parameter"] is False
    p.grad = torch.ones_like(p)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full_like(p, -1e-3), rtol=1e-3, atol=1e-7)


def test_eight_bit_without_bitsandbytes_says_why_and_what_to_choose(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    for name in ("adamw8bit", "lion8bit"):
        with pytest.raises(ConfigError) as err:
            optim.build_optimizer([{"params": quadratic_params()}], OptimizerConfig(name=name), "cpu")
        text = str(err.value)
        assert f"optimizer.name = '{name}'" in text and "bitsandbytes" in text and "not installed" in text
        assert "pip install bitsandbytes" in text and "choose adamw" in text


def test_eight_bit_that_cannot_run_on_the_device_says_why(monkeypatch):
    class Broken:
        def __init__(self, params, **kwargs):
            pass

        def step(self):
            raise RuntimeError("CUDA driver not found")

    fake = types.SimpleNamespace(__version__="0.42.0", optim=types.SimpleNamespace(AdamW8bit=Broken))
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    with pytest.raises(ConfigError) as err:
        optim.build_optimizer([{"params": quadratic_params()}], OptimizerConfig(name="adamw8bit"), "cpu")
    text = str(err.value)
    assert "bitsandbytes 0.42.0 cannot run AdamW8bit on device 'cpu'" in text
    assert "CUDA driver not found" in text and "CUDA GPU" in text and "choose adamw" in text
    with pytest.raises(ConfigError, match="has no optim.Lion8bit"):
        optim.build_optimizer([{"params": quadratic_params()}], OptimizerConfig(name="lion8bit"), "cpu")


def test_real_bitsandbytes_if_installed():
    """Where bitsandbytes is installed it either trains here or refuses with the clear message."""
    pytest.importorskip("bitsandbytes")
    params = [torch.nn.Parameter(torch.randn(64, 128, generator=torch.Generator().manual_seed(0)))]
    before = quadratic_loss(params).item()
    try:
        opt = optim.build_optimizer([{"params": params}], OptimizerConfig(name="adamw8bit", learning_rate=0.05), "cpu")
    except ConfigError as e:
        assert "cannot run AdamW8bit on device 'cpu'" in str(e)
        return
    assert run(opt, params, 30) < 0.5 * before


def test_unknown_optimizer_and_scheduler_name_the_setting():
    with pytest.raises(ConfigError, match="optimizer.name = 'prodigy'.*adamw, adamw8bit, lion8bit, adafactor, sgd"):
        optim.build_optimizer([{"params": quadratic_params()}], OptimizerConfig(name="prodigy"), "cpu")
    opt = optim.build_optimizer([{"params": quadratic_params()}], OptimizerConfig(), "cpu")
    with pytest.raises(ConfigError, match="optimizer.scheduler = 'step'"):
        optim.build_lr_scheduler(opt, OptimizerConfig(scheduler="step"), 10)


def m(step, name, total=110, warmup=10, **kw):
    return optim.lr_multiplier(step, name, total, warmup, **kw)


def test_warmup_starts_above_zero_and_reaches_full_lr():
    assert m(0, "constant") == pytest.approx(0.1)
    assert m(4, "constant_with_warmup") == pytest.approx(0.5)
    assert m(9, "cosine") == pytest.approx(1.0)
    assert m(10, "linear") == pytest.approx(1.0)
    assert optim.lr_multiplier(0, "constant", 100, 0) == 1.0


def test_decay_schedules_point_by_point():
    # after 10 warmup steps, 100 decay steps: step 60 is half-way, 110 the end
    assert m(60, "cosine") == pytest.approx(0.5)
    assert m(35, "cosine") == pytest.approx(0.5 * (1 + 2 ** -0.5))
    assert m(110, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert m(60, "linear") == pytest.approx(0.5)
    assert m(85, "linear") == pytest.approx(0.25)
    assert m(60, "polynomial", power=2.0) == pytest.approx(0.25)
    assert m(60, "polynomial", power=1.0) == pytest.approx(m(60, "linear"))
    assert m(200, "constant") == 1.0 and m(200, "linear") == 0.0
    # 2 restarts: each half of the decay phase is a full cosine from 1 to 0
    assert m(35, "cosine_with_restarts", num_cycles=2) == pytest.approx(0.5)
    assert m(60, "cosine_with_restarts", num_cycles=2) == pytest.approx(1.0)
    assert m(85, "cosine_with_restarts", num_cycles=2) == pytest.approx(0.5)
    assert m(110, "cosine_with_restarts", num_cycles=2) == 0.0


def test_scheduler_drives_optimizer_lr_and_round_trips_state():
    cfg = OptimizerConfig(learning_rate=1.0, scheduler="cosine", warmup_steps=2)
    opt = optim.build_optimizer([{"params": quadratic_params()}], cfg, "cpu")
    sched = optim.build_lr_scheduler(opt, cfg, 12)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(6):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0]) and lrs[6] == pytest.approx(m(6, "cosine", 12, 2))
    state = sched.state_dict()
    opt2 = optim.build_optimizer([{"params": quadratic_params()}], cfg, "cpu")
    sched2 = optim.build_lr_scheduler(opt2, cfg, 12)
    sched2.load_state_dict(state)
    for _ in range(4):
        sched.step()
        sched2.step()
        assert sched.get_last_lr() == sched2.get_last_lr()
        assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


@pytest.mark.parametrize("bad", [{"warmup_steps": -1}, {"scheduler": "cosine_with_restarts", "num_cycles": 0},
                                 {"scheduler": "polynomial", "power": 0.0}])
def test_bad_scheduler_settings(bad):
    opt = optim.build_optimizer([{"params": quadratic_params()}], OptimizerConfig(), "cpu")
    with pytest.raises(ConfigError, match="optimizer."):
        optim.build_lr_scheduler(opt, dataclasses.replace(OptimizerConfig(), **bad), 10)


def test_clip_grad_norm_returns_norm_and_clips():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 0.0, 0.0])
    assert optim.clip_grad_norm([a, b], 0) == pytest.approx(5.0)  # 0: measure only
    assert a.grad[0].item() == 3.0
    assert optim.clip_grad_norm(iter([a, b]), 1.0) == pytest.approx(5.0)
    assert torch.linalg.vector_norm(torch.cat([a.grad, b.grad])).item() == pytest.approx(1.0, rel=1e-4)
    assert optim.clip_grad_norm([torch.nn.Parameter(torch.zeros(2))], 1.0) == 0.0  # no grads yet


def test_optimizer_state_bytes():
    n = 1_000_000
    assert optim.optimizer_state_bytes("adamw", n) == 8 * n
    assert optim.optimizer_state_bytes("sgd", n) == 4 * n
    assert 2 * n < optim.optimizer_state_bytes("adamw8bit", n) < 2.1 * n
    assert n < optim.optimizer_state_bytes("lion8bit", n) < 1.05 * n
    assert optim.optimizer_state_bytes("adafactor", n) < optim.optimizer_state_bytes("adamw8bit", n)
    with pytest.raises(ConfigError):
        optim.optimizer_state_bytes("adam", n)
