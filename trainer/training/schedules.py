"""Noise schedules: how a clean latent is noised, what the model should predict, and how noise levels are drawn.

Two families cover SD1.5/SDXL and flow-matching models:

* :class:`DiscreteSchedule` - variance-preserving DDPM form, ``xt = sqrt(a)*x0 + sqrt(1-a)*eps`` with
  ``a = alphas_cumprod[t]``. Timesteps are integer indices ``0..N-1`` (long tensor); higher = noisier.
  Targets: ``eps`` -> eps, ``v`` -> ``sqrt(a)*eps - sqrt(1-a)*x0``. SNR = ``a / (1-a)``.
* :class:`FlowSchedule` - rectified flow, ``xt = (1-s)*x0 + s*eps``; the timestep *is* sigma ``s`` in (0, 1)
  (float tensor); target velocity ``eps - x0``. SNR = ``((1-s)/s)**2``.

Timesteps are drawn on the CPU from the caller's ``torch.Generator`` (so a saved generator state resumes the same
draws) and returned on the CPU; ``add_noise``/``target``/``snr`` accept them on any device.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch

from ..choices import TIMESTEP_SAMPLINGS
from ..config import ObjectiveConfig
from ..errors import ConfigError

# diffusers spells prediction types differently; accept both so hosts can pass scheduler configs through.
PREDICTION_ALIASES = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v", "flow": "flow"}
SIGMA_MARGIN = 1e-5  # flow sigmas stay inside (0, 1): SNR is infinite at 0 and the target degenerate at 1


def check_choice(setting: str, value: str, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ConfigError naming the setting."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{setting} = {value!r} is not valid; choose one of: {', '.join(choices)}")
    return value


def time_shift(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift ``shift*s / (1 + (shift-1)*s)``: shift > 1 moves mass towards noisier levels."""
    return shift * sigma / (1 + (shift - 1) * sigma)


# Flux's resolution-dependent shift (the reference trainers' "flux_shift"): mu grows linearly with the image's token
# count, 0.5 at 256 tokens (256 px) to 1.15 at 4096 tokens (1024 px), and the SD3-style shift is exp(mu).
FLUX_SHIFT_TOKENS = (256, 4096)
FLUX_SHIFT_MU = (0.5, 1.15)


def flux_shift(latent_shape: Sequence[int], patch: int = 2) -> float:
    """The SD3-style shift for an image latent of this shape (last two dims: height, width), 2x2 patches."""
    tokens = (int(latent_shape[-2]) // patch) * (int(latent_shape[-1]) // patch)
    (t0, t1), (m0, m1) = FLUX_SHIFT_TOKENS, FLUX_SHIFT_MU
    return math.exp(m0 + (m1 - m0) * (tokens - t0) / (t1 - t0))


def sample_unit_interval(batch_size: int, generator: Optional[torch.Generator], cfg: ObjectiveConfig,
                         default_shift: float = 1.0, latent_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Draw noise levels in [0, 1] (float32, CPU) according to ``cfg.timestep_sampling`` (``auto`` must have been
    resolved by :func:`resolve_timestep_sampling`).

    ``uniform``: U(0, 1). ``logit_normal``: sigmoid(N(logit_mean, logit_std)), SD3's choice, concentrating on
    mid noise levels. ``shifted``: the logit-normal draw passed through :func:`time_shift` with ``cfg.flow_shift``
    (kohya/musubi's "shift" sampling); ``flow_shift <= 0`` means the schedule's own shift (``default_shift``).
    ``flux_shift``: the logit-normal draw shifted by :func:`flux_shift` of ``latent_shape``.
    """
    kind = check_choice("objective.timestep_sampling", cfg.timestep_sampling, TIMESTEP_SAMPLINGS)
    if kind == "auto":
        raise ValueError("timestep_sampling 'auto' reached the sampler: resolve it first (resolve_timestep_sampling)")
    if kind == "uniform":
        return torch.rand(batch_size, generator=generator)
    if cfg.logit_std <= 0:
        raise ConfigError(f"objective.logit_std = {cfg.logit_std} must be > 0 (1.0 is the usual value)")
    u = torch.randn(batch_size, generator=generator) * cfg.logit_std + cfg.logit_mean
    sigma = torch.sigmoid(u)
    if kind == "shifted":
        shift = cfg.flow_shift if cfg.flow_shift > 0 else default_shift
        sigma = time_shift(sigma, shift)
    elif kind == "flux_shift":
        if latent_shape is None:
            raise ValueError("flux_shift timestep sampling needs the latent's shape")
        sigma = time_shift(sigma, flux_shift(latent_shape))
    return sigma


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) coefficients -> (B, 1, 1, ...) on ``like``'s device and dtype, to broadcast over a latent."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class NoiseSchedule:
    """Base class. ``prediction`` is the model's parameterization: "eps", "v" or "flow".

    ``timestep_unit`` says what a timestep means: ``"index"`` (integer 0..N-1, DDPM) or ``"sigma"`` (float in
    (0, 1), flow). Hosts convert it to whatever their denoiser expects.
    """

    prediction: str
    timestep_unit: str

    auto_sampling = "uniform"  # what timestep_sampling "auto" means on this schedule

    def sample_timesteps(self, batch_size: int, generator: Optional[torch.Generator],
                         cfg: ObjectiveConfig, latent_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """``batch_size`` timesteps; ``latent_shape`` (of one sample) is needed by resolution-dependent samplings."""
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def x0_from_prediction(self, xt: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean latent implied by a model output (previews, tests)."""
        raise NotImplementedError

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio per timestep, float32 on ``t``'s device."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the node's text, logs and metadata: the prediction type and the schedule."""
        raise NotImplementedError

    def identity(self) -> str:
        """Changes whenever training on this schedule would compute something else (run identity)."""
        raise NotImplementedError


class DiscreteSchedule(NoiseSchedule):
    timestep_unit = "index"

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: str = "eps"):
        prediction = PREDICTION_ALIASES.get(prediction, prediction)
        self.prediction = check_choice("prediction", prediction, ("eps", "v"))
        # float64 on the CPU: 1 - a is tiny at t=0 and float32 would lose most of its digits
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
        if self.alphas_cumprod.ndim != 1 or len(self.alphas_cumprod) < 2:
            raise ValueError("alphas_cumprod must be a 1-D tensor with at least 2 entries")

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @classmethod
    def from_betas(cls, beta_start: float = 0.00085, beta_end: float = 0.012, schedule: str = "scaled_linear",
                   num: int = 1000, prediction: str = "eps", zero_terminal_snr: bool = False) -> "DiscreteSchedule":
        """SD1.5/SDXL use ``scaled_linear`` (linear in sqrt(beta), then squared) - ComfyUI calls the same thing
        "linear". ``linear`` here is diffusers' plain linspace of betas."""
        check_choice("beta schedule", schedule, ("scaled_linear", "linear"))
        if schedule == "scaled_linear":
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(beta_start, beta_end, num, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        if zero_terminal_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
        return cls(alphas_cumprod, prediction)

    @classmethod
    def from_sigmas(cls, sigmas: torch.Tensor, prediction: str = "eps") -> "DiscreteSchedule":
        """ComfyUI's ``model_sampling.sigmas`` are ``sqrt((1-a)/a)``, so ``a = 1 / (1 + sigma**2)``."""
        sigmas = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
        return cls(1.0 / (1.0 + sigmas ** 2), prediction)

    def sample_timesteps(self, batch_size, generator, cfg, latent_shape=None):
        """Integer indices (long, CPU). ``uniform`` draws integers directly; ``logit_normal``/``shifted`` draw a
        level in (0, 1) as for flow models and map it to ``floor(level * N)``, so shift > 1 favours noisier
        (higher) indices exactly as it favours higher sigmas in a flow schedule."""
        n = self.num_timesteps
        cfg = _resolved_objective(cfg, self)
        if cfg.timestep_sampling == "flux_shift":
            raise ConfigError("objective.timestep_sampling = 'flux_shift' is for flow models (Flux, Chroma, "
                              "Qwen-Image); this model trains on a discrete schedule: use auto or uniform")
        if cfg.timestep_sampling == "uniform":
            return torch.randint(0, n, (batch_size,), generator=generator)
        level = sample_unit_interval(batch_size, generator, cfg)
        return (level * n).floor().long().clamp_(0, n - 1)

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor):
        a = self.alphas_cumprod[t.detach().to("cpu").long()]
        return _per_sample(a.sqrt(), like), _per_sample((1 - a).sqrt(), like)

    def add_noise(self, x0, noise, t):
        signal, noise_scale = self._coefficients(t, x0)
        return signal * x0 + noise_scale * noise

    def target(self, x0, noise, t):
        if self.prediction == "eps":
            return noise
        signal, noise_scale = self._coefficients(t, x0)
        return signal * noise - noise_scale * x0

    def x0_from_prediction(self, xt, pred, t):
        signal, noise_scale = self._coefficients(t, xt)
        if self.prediction == "eps":
            return (xt - noise_scale * pred) / signal
        return signal * xt - noise_scale * pred  # v: since signal**2 + noise_scale**2 == 1

    def snr(self, t):
        a = self.alphas_cumprod[t.detach().to("cpu").long()]
        return (a / (1 - a)).to(device=t.device, dtype=torch.float32)

    def describe(self) -> str:
        zsnr = ", zero terminal SNR" if float(self.alphas_cumprod[-1]) < 1e-6 else ""
        return f"prediction: {self.prediction} ({self.num_timesteps}-step discrete schedule{zsnr})"

    def identity(self) -> str:
        import hashlib

        values = self.alphas_cumprod.to(torch.float32).numpy().tobytes()  # float32: robust to float64 rounding noise
        return f"{self.describe()} {hashlib.sha256(values).hexdigest()[:16]}"


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"): shift and scale
    sqrt(a) so the last step is pure noise while the first keeps its value. The last a is set to a tiny positive
    value instead of 0 so sigma and 1/SNR stay finite (ComfyUI's zsnr does the same)."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    rescaled = root ** 2
    rescaled[-1] = 1e-8
    return rescaled


class FlowSchedule(NoiseSchedule):
    """Rectified flow. ``shift`` is the model's own sampling shift (ComfyUI's ``model_sampling.shift``; SD3 uses
    3.0, Flux resolution-dependent); ``shifted`` sampling uses it when ``objective.flow_shift <= 0``."""

    prediction = "flow"
    timestep_unit = "sigma"

    def __init__(self, shift: float = 1.0, auto_sampling: str = "shifted"):
        if shift <= 0:
            raise ValueError(f"flow shift must be > 0, got {shift}")
        self.shift = float(shift)
        self.auto_sampling = check_choice("auto timestep sampling", auto_sampling,
                                          [c for c in TIMESTEP_SAMPLINGS if c != "auto"])

    def sample_timesteps(self, batch_size, generator, cfg, latent_shape=None):
        cfg = _resolved_objective(cfg, self)
        sigma = sample_unit_interval(batch_size, generator, cfg, default_shift=self.shift, latent_shape=latent_shape)
        return sigma.clamp_(SIGMA_MARGIN, 1 - SIGMA_MARGIN)

    def add_noise(self, x0, noise, t):
        sigma = _per_sample(t, x0)
        return (1 - sigma) * x0 + sigma * noise

    def target(self, x0, noise, t):
        return noise - x0

    def x0_from_prediction(self, xt, pred, t):
        return xt - _per_sample(t, xt) * pred

    def snr(self, t):
        sigma = t.to(torch.float32)
        return ((1 - sigma) / sigma) ** 2

    def describe(self) -> str:
        return f"prediction: flow (rectified flow, sampling shift {self.shift:.3g})"

    def identity(self) -> str:
        return self.describe()


def resolve_timestep_sampling(cfg, schedule: NoiseSchedule):
    """``cfg`` (a TrainConfig) with timestep_sampling ``auto`` replaced by what it means on ``schedule`` (the
    family's recipe; ``shifted`` then uses the model's own shift). Other values come back unchanged. Resolved
    before the run identity is computed, so "auto" and the value it stands for are the same run."""
    import dataclasses

    if cfg.objective.timestep_sampling != "auto":
        return cfg
    return dataclasses.replace(cfg, objective=_resolved_objective(cfg.objective, schedule))


def _resolved_objective(obj: ObjectiveConfig, schedule: NoiseSchedule) -> ObjectiveConfig:
    import dataclasses

    if obj.timestep_sampling != "auto":
        return obj
    kind = schedule.auto_sampling
    return dataclasses.replace(obj, timestep_sampling=kind, flow_shift=0.0 if kind == "shifted" else obj.flow_shift)


def describe_timesteps(cfg: ObjectiveConfig) -> str:
    """One line for logs and metadata."""
    if cfg.timestep_sampling in ("uniform", "auto"):
        return cfg.timestep_sampling
    if cfg.timestep_sampling == "flux_shift":
        return (f"logit_normal(mean={cfg.logit_mean:g}, std={cfg.logit_std:g}) shifted by the image's token count "
                f"(Flux: mu {FLUX_SHIFT_MU[0]:g} at {FLUX_SHIFT_TOKENS[0]} to {FLUX_SHIFT_MU[1]:g} at "
                f"{FLUX_SHIFT_TOKENS[1]} tokens)")
    text = f"logit_normal(mean={cfg.logit_mean:g}, std={cfg.logit_std:g})"
    if cfg.timestep_sampling == "shifted":
        text += f" shifted by {cfg.flow_shift:g}" if cfg.flow_shift > 0 else " shifted by the model's shift"
    return text
