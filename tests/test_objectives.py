"""Objective: noise offset, min-SNR-gamma weights, loss variants and reductions, config validation."""
import dataclasses

import pytest
import torch

from trainer.config import ObjectiveConfig
from trainer.errors import ConfigError
from trainer.training import objectives
from trainer.training.schedules import DiscreteSchedule, FlowSchedule


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_noise_without_offset_is_plain_randn_from_the_generator():
    x0 = torch.zeros(2, 4, 8, 8)
    noise = objectives.sample_noise(x0, gen(5), ObjectiveConfig())
    assert torch.equal(noise, torch.randn(x0.shape, generator=gen(5)))


def test_noise_offset_adds_one_value_per_sample_and_channel():
    x0 = torch.zeros(3, 4, 16, 16, dtype=torch.bfloat16)
    cfg = ObjectiveConfig(noise_offset=0.5)
    g = gen(7)
    noise = objectives.sample_noise(x0, g, cfg)
    assert noise.dtype == torch.bfloat16 and noise.shape == x0.shape
    ref = gen(7)
    base = torch.randn(x0.shape, generator=ref)
    offset = torch.randn(3, 4, 1, 1, generator=ref)
    torch.testing.assert_close(noise, (base + 0.5 * offset).to(torch.bfloat16))
    # and the generator advanced by exactly those two draws
    assert torch.equal(g.get_state(), ref.get_state())


def test_min_snr_formulas():
    snr = torch.tensor([0.5, 5.0, 20.0])
    torch.testing.assert_close(objectives.min_snr_weights(snr, 5.0, "eps"), torch.tensor([1.0, 1.0, 0.25]))
    torch.testing.assert_close(objectives.min_snr_weights(snr, 5.0, "v"),
                               torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21]))
    # flow: sigma = 0.5 -> SNR 1 -> weight 1 * 0.5**2; sigma = 0.1 -> SNR 81 -> 5 * 0.01
    fs = FlowSchedule().snr(torch.tensor([0.5, 0.1]))
    torch.testing.assert_close(objectives.min_snr_weights(fs, 5.0, "flow"), torch.tensor([0.25, 0.05]))


def test_loss_weights_use_schedule_snr_and_gamma_zero_gives_ones():
    s = DiscreteSchedule.from_betas(prediction="eps")
    t = torch.tensor([0, 100, 500, 999])
    ones = objectives.loss_weights(s, t, ObjectiveConfig(min_snr_gamma=0))
    assert torch.equal(ones, torch.ones(4))
    w = objectives.loss_weights(s, t, ObjectiveConfig(min_snr_gamma=5))
    snr = s.snr(t)
    torch.testing.assert_close(w, torch.clamp(snr, max=5) / snr)
    assert w[0] < 0.01 and w[-1] == 1.0  # clean steps down-weighted, noisy ones kept
    z = DiscreteSchedule.from_betas(prediction="eps", zero_terminal_snr=True)
    assert torch.isfinite(objectives.loss_weights(z, torch.tensor([999]), ObjectiveConfig(min_snr_gamma=5))).all()


def test_loss_kinds_on_known_residuals():
    pred = torch.zeros(2, 1, 1, 2)
    target = torch.tensor([[[[0.01, 2.0]]], [[[0.0, 0.0]]]])
    mse = objectives.loss(pred, target, None, ObjectiveConfig(loss="mse"), reduction="none")
    torch.testing.assert_close(mse, torch.tensor([(0.0001 + 4.0) / 2, 0.0]))
    l1 = objectives.loss(pred, target, None, ObjectiveConfig(loss="l1"), reduction="none")
    torch.testing.assert_close(l1, torch.tensor([1.005, 0.0]))
    huber = objectives.elementwise_loss(pred, target, ObjectiveConfig(loss="huber", huber_delta=0.1))[0, 0, 0]
    assert huber[0].item() == pytest.approx(0.0001, rel=0.02)  # ~ squared error for small residuals
    assert huber[1].item() == pytest.approx(2 * 0.1 * 2.0, rel=0.06)  # ~ 2*delta*|r| for large ones
    assert huber[1].item() < 4.0


def test_weighted_mean_divides_by_batch_not_weight_sum():
    pred, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    target[1] *= 2  # per-sample mse: 1 and 4
    w = torch.tensor([0.5, 0.25])
    cfg = ObjectiveConfig()
    torch.testing.assert_close(objectives.loss(pred, target, w, cfg, reduction="none"), torch.tensor([0.5, 1.0]))
    assert objectives.loss(pred, target, w, cfg).item() == pytest.approx(0.75)
    assert objectives.loss(pred[:1], target[:1], w[:1], cfg).item() == pytest.approx(0.5)  # batch 1 keeps weight
    torch.testing.assert_close(objectives.per_sample_loss(pred, target, cfg), torch.tensor([1.0, 4.0]))


def test_loss_is_float32_and_differentiable_for_bf16_outputs():
    pred = torch.randn(2, 4, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    out = objectives.loss(pred, torch.zeros(2, 4, 4, 4), torch.ones(2), ObjectiveConfig(loss="huber"))
    assert out.dtype == torch.float32 and out.ndim == 0
    out.backward()
    assert pred.grad is not None and pred.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("change, setting", [
    ({"loss": "smooth_l1"}, "objective.loss.*mse, huber, l1"),
    ({"timestep_sampling": "sigma"}, "objective.timestep_sampling"),
    ({"logit_std": 0.0}, "objective.logit_std"),
    ({"min_snr_gamma": -1.0}, "objective.min_snr_gamma"),
    ({"noise_offset": -0.1}, "objective.noise_offset"),
    ({"loss": "huber", "huber_delta": 0.0}, "objective.huber_delta"),
])
def test_validation_names_the_setting(change, setting):
    cfg = dataclasses.replace(ObjectiveConfig(), **change)
    with pytest.raises(ConfigError, match=setting):
        objectives.validate_objective(cfg)


def test_defaults_are_valid_and_loss_rejects_bad_kind():
    objectives.validate_objective(ObjectiveConfig())
    with pytest.raises(ConfigError, match="objective.loss"):
        objectives.loss(torch.zeros(1, 1), torch.zeros(1, 1), None, ObjectiveConfig(loss="l2"))
