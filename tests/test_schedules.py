"""Noise schedules: noising/target identities, SNR, timestep sampling and ComfyUI sigma compatibility."""
import pytest
import torch

from trainer.config import ObjectiveConfig
from trainer.errors import ConfigError
from trainer.training.schedules import DiscreteSchedule, FlowSchedule, rescale_zero_terminal_snr, time_shift

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def latents(seed=1, shape=(6, 4, 8, 8)):
    g = gen(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_sd_schedule_matches_known_values():
    s = DiscreteSchedule.from_betas(**SD_BETAS)
    assert s.num_timesteps == 1000
    # SD's scaled-linear schedule: first and last alphas_cumprod are 1 - 0.00085 and ~0.0047
    assert s.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085)
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.004660, rel=1e-3)


def test_eps_noising_identity_recovers_noise():
    s = DiscreteSchedule.from_betas(**SD_BETAS, prediction="eps")
    x0, eps = latents()
    t = torch.tensor([0, 10, 250, 500, 900, 999])
    xt = s.add_noise(x0, eps, t)
    a = s.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close((xt - a.sqrt() * x0) / (1 - a).sqrt(), eps, atol=2e-4, rtol=1e-4)
    assert torch.equal(s.target(x0, eps, t), eps)
    torch.testing.assert_close(s.x0_from_prediction(xt, eps, t), x0, atol=1e-3, rtol=1e-3)


def test_v_target_reconstructs_x0_and_noise():
    s = DiscreteSchedule.from_betas(**SD_BETAS, prediction="v_prediction")  # diffusers spelling accepted
    assert s.prediction == "v"
    x0, eps = latents()
    t = torch.tensor([0, 10, 250, 500, 900, 999])
    xt, v = s.add_noise(x0, eps, t), s.target(x0, eps, t)
    a = s.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * xt - (1 - a).sqrt() * v, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((1 - a).sqrt() * xt + a.sqrt() * v, eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.x0_from_prediction(xt, v, t), x0, atol=1e-5, rtol=1e-5)


def test_flow_noising_and_velocity_target():
    s = FlowSchedule()
    x0, eps = latents()
    t = torch.tensor([0.01, 0.2, 0.5, 0.7, 0.9, 0.99])
    xt, v = s.add_noise(x0, eps, t), s.target(x0, eps, t)
    sig = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, (1 - sig) * x0 + sig * eps)
    torch.testing.assert_close(v, eps - x0)
    torch.testing.assert_close(s.x0_from_prediction(xt, v, t), x0, atol=1e-5, rtol=1e-5)


def test_snr_values_and_monotone():
    d = DiscreteSchedule.from_betas(**SD_BETAS)
    snr = d.snr(torch.arange(1000))
    assert snr.dtype == torch.float32 and bool((snr[1:] < snr[:-1]).all())  # noisier index, lower SNR
    a = d.alphas_cumprod[500].item()
    assert snr[500].item() == pytest.approx(a / (1 - a), rel=1e-5)
    f = FlowSchedule()
    sig = torch.linspace(0.05, 0.95, 19)
    fs = f.snr(sig)
    assert bool((fs[1:] < fs[:-1]).all())
    assert f.snr(torch.tensor([0.5])).item() == pytest.approx(1.0)
    assert f.snr(torch.tensor([0.25])).item() == pytest.approx(9.0)


def test_from_sigmas_equals_from_betas_for_comfyui_sigmas():
    # ComfyUI's ModelSamplingDiscrete: betas = linspace(sqrt(start), sqrt(end))**2 in float64,
    # sigmas = sqrt((1 - acp) / acp), stored in float32.
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    acp = torch.cumprod(1 - betas, 0)
    sigmas = ((1 - acp) / acp).sqrt().float()
    a = DiscreteSchedule.from_sigmas(sigmas).alphas_cumprod
    b = DiscreteSchedule.from_betas(**SD_BETAS).alphas_cumprod
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_zero_terminal_snr_rescale():
    acp = DiscreteSchedule.from_betas(**SD_BETAS).alphas_cumprod
    z = rescale_zero_terminal_snr(acp)
    assert z[0].item() == pytest.approx(acp[0].item())
    assert z[-1].item() < 1e-7 and bool((z[1:] < z[:-1]).all())
    s = DiscreteSchedule.from_betas(**SD_BETAS, zero_terminal_snr=True, prediction="v")
    assert torch.isfinite(s.snr(torch.tensor([999]))).all()


@pytest.mark.parametrize("schedule", [DiscreteSchedule.from_betas(**SD_BETAS), FlowSchedule()])
@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "shifted"])
def test_timesteps_in_range_and_deterministic(schedule, kind):
    cfg = ObjectiveConfig(timestep_sampling=kind)
    t = schedule.sample_timesteps(4096, gen(3), cfg)
    assert t.shape == (4096,) and t.device.type == "cpu"
    if isinstance(schedule, DiscreteSchedule):
        assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    else:
        assert t.is_floating_point() and t.min() > 0 and t.max() < 1
    assert torch.equal(t, schedule.sample_timesteps(4096, gen(3), cfg))
    # resuming from a saved generator state continues the same stream
    g = gen(3)
    schedule.sample_timesteps(10, g, cfg)
    state = g.get_state()
    after = schedule.sample_timesteps(10, g, cfg)
    g2 = torch.Generator()
    g2.set_state(state)
    assert torch.equal(after, schedule.sample_timesteps(10, g2, cfg))


def test_distribution_shapes():
    f = FlowSchedule()
    n = 20000
    uni = f.sample_timesteps(n, gen(), ObjectiveConfig(timestep_sampling="uniform"))
    ln = f.sample_timesteps(n, gen(), ObjectiveConfig(timestep_sampling="logit_normal"))
    assert uni.mean().item() == pytest.approx(0.5, abs=0.01)
    assert uni.std().item() == pytest.approx((1 / 12) ** 0.5, abs=0.01)
    assert ln.mean().item() == pytest.approx(0.5, abs=0.01)
    assert ln.std().item() < uni.std().item() - 0.05  # concentrated on middle noise levels
    right = f.sample_timesteps(n, gen(), ObjectiveConfig(timestep_sampling="logit_normal", logit_mean=1.0))
    assert right.mean().item() > 0.65
    shifted = f.sample_timesteps(n, gen(), ObjectiveConfig(timestep_sampling="shifted", flow_shift=3.0))
    assert shifted.mean().item() > 0.65  # shift > 1 favours noisier levels
    unshifted = f.sample_timesteps(n, gen(), ObjectiveConfig(timestep_sampling="shifted", flow_shift=1.0))
    torch.testing.assert_close(unshifted, ln)
    d = DiscreteSchedule.from_betas(**SD_BETAS)
    du = d.sample_timesteps(n, gen(), ObjectiveConfig(timestep_sampling="uniform")).float()
    ds = d.sample_timesteps(n, gen(), ObjectiveConfig(timestep_sampling="shifted", flow_shift=3.0)).float()
    assert du.mean().item() == pytest.approx(499.5, abs=10)
    assert ds.mean().item() > 650
    assert len(torch.unique(du)) > 990  # every index reachable


def test_flow_shift_zero_uses_model_shift():
    cfg0 = ObjectiveConfig(timestep_sampling="shifted", flow_shift=0)
    cfg3 = ObjectiveConfig(timestep_sampling="shifted", flow_shift=3.0)
    torch.testing.assert_close(FlowSchedule(shift=3.0).sample_timesteps(64, gen(), cfg0),
                               FlowSchedule(shift=1.0).sample_timesteps(64, gen(), cfg3))


def test_time_shift_formula():
    assert time_shift(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    assert time_shift(torch.tensor(0.25), 1.0).item() == pytest.approx(0.25)


def test_bad_settings_name_the_setting():
    with pytest.raises(ConfigError, match="objective.timestep_sampling.*uniform, logit_normal, shifted"):
        FlowSchedule().sample_timesteps(2, gen(), ObjectiveConfig(timestep_sampling="sigmoid"))
    with pytest.raises(ConfigError, match="prediction"):
        DiscreteSchedule.from_betas(prediction="flow")


def test_low_precision_latents_keep_dtype_and_device():
    s = DiscreteSchedule.from_betas(**SD_BETAS, prediction="v")
    x0, eps = (x.to(torch.bfloat16) for x in latents())
    t = torch.tensor([1, 2, 3, 4, 5, 6])
    assert s.add_noise(x0, eps, t).dtype == torch.bfloat16
    assert s.target(x0, eps, t).dtype == torch.bfloat16


def test_describe_timesteps_for_logs():
    from trainer.training.schedules import describe_timesteps

    assert describe_timesteps(ObjectiveConfig(timestep_sampling="uniform")) == "uniform"
    assert describe_timesteps(ObjectiveConfig(timestep_sampling="shifted", flow_shift=3)) == \
        "logit_normal(mean=0, std=1) shifted by 3"


def test_flux_shift_follows_the_token_count_of_the_image():
    """mu = 0.5 at 256 tokens (a 256 px image: 32x32 latent, 2x2 patches) to 1.15 at 4096 (1024 px); the SD3-style
    shift is exp(mu), and the draw is the logit-normal one shifted by it."""
    import math

    from trainer.config import ObjectiveConfig
    from trainer.training.schedules import FlowSchedule, flux_shift, time_shift

    assert flux_shift((16, 32, 32)) == pytest.approx(math.exp(0.5))
    assert flux_shift((16, 128, 128)) == pytest.approx(math.exp(1.15))
    assert flux_shift((16, 96, 64)) == pytest.approx(math.exp(0.5 + 0.65 * (48 * 32 - 256) / 3840))
    cfg = ObjectiveConfig(timestep_sampling="flux_shift")
    small = FlowSchedule(3.0).sample_timesteps(4, torch.Generator().manual_seed(0), cfg, latent_shape=(16, 32, 32))
    large = FlowSchedule(3.0).sample_timesteps(4, torch.Generator().manual_seed(0), cfg, latent_shape=(16, 128, 128))
    plain = torch.sigmoid(torch.randn(4, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(small, time_shift(plain, math.exp(0.5)))
    torch.testing.assert_close(large, time_shift(plain, math.exp(1.15)))
    assert (large > small).all()  # bigger images train on noisier levels


def test_auto_timestep_sampling_is_the_familys_recipe_and_the_same_run():
    from trainer.config import TrainConfig
    from trainer.training.identity import settings_digest
    from trainer.training.schedules import DiscreteSchedule, FlowSchedule, resolve_timestep_sampling

    cfg = TrainConfig()
    assert cfg.objective.timestep_sampling == "auto"
    sd = resolve_timestep_sampling(cfg, DiscreteSchedule.from_betas())
    assert sd.objective.timestep_sampling == "uniform"
    explicit = TrainConfig.from_dict({"objective": {"timestep_sampling": "uniform"}})
    assert settings_digest(sd) == settings_digest(resolve_timestep_sampling(explicit, DiscreteSchedule.from_betas()))
    sd3 = resolve_timestep_sampling(cfg, FlowSchedule(3.0, auto_sampling="shifted")).objective
    assert (sd3.timestep_sampling, sd3.flow_shift) == ("shifted", 0.0)  # 0: the model's own shift
    flux = resolve_timestep_sampling(cfg, FlowSchedule(3.16, auto_sampling="flux_shift")).objective
    assert flux.timestep_sampling == "flux_shift"
    g = torch.Generator().manual_seed(5)
    drawn = FlowSchedule(3.0).sample_timesteps(8, g, cfg.objective, latent_shape=(16, 8, 8))  # auto: shifted
    plain = torch.sigmoid(torch.randn(8, generator=torch.Generator().manual_seed(5)))
    torch.testing.assert_close(drawn, time_shift(plain, 3.0))


def test_flux_shift_is_refused_on_a_discrete_schedule():
    from trainer.config import ObjectiveConfig
    from trainer.errors import ConfigError
    from trainer.training.schedules import DiscreteSchedule

    with pytest.raises(ConfigError, match="flow models"):
        DiscreteSchedule.from_betas().sample_timesteps(1, None, ObjectiveConfig(timestep_sampling="flux_shift"))
