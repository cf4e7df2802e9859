"""Training objective: noise (with offset), per-sample loss weights (min-SNR-gamma) and the loss itself.

The loss is computed on the model's native output (eps / v / flow velocity) against ``schedule.target``; see
``ARCHITECTURE.md``. All random draws come from the caller's CPU ``torch.Generator`` so a resumed run draws the same noise.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from ..choices import LOSSES, TIMESTEP_SAMPLINGS
from ..config import ObjectiveConfig
from ..errors import ConfigError
from .schedules import check_choice

if TYPE_CHECKING:
    from .schedules import NoiseSchedule

REDUCTIONS = ("mean", "none")
SNR_FLOOR = 1e-8  # zero-terminal-SNR schedules reach SNR 0 at the last step; keep the eps weight finite there


def validate_objective(cfg: ObjectiveConfig) -> None:
    """Raise one ConfigError naming the first bad setting (call this before training starts)."""
    check_choice("objective.timestep_sampling", cfg.timestep_sampling, TIMESTEP_SAMPLINGS)
    check_choice("objective.loss", cfg.loss, LOSSES)
    if cfg.logit_std <= 0:
        raise ConfigError(f"objective.logit_std = {cfg.logit_std} must be > 0 (1.0 is the usual value)")
    if cfg.min_snr_gamma < 0:
        raise ConfigError(f"objective.min_snr_gamma = {cfg.min_snr_gamma} must be >= 0 (0 disables, 5 is usual)")
    if cfg.noise_offset < 0:
        raise ConfigError(f"objective.noise_offset = {cfg.noise_offset} must be >= 0 (0 disables, 0.05 is usual)")
    if cfg.loss == "huber" and cfg.huber_delta <= 0:
        raise ConfigError(f"objective.huber_delta = {cfg.huber_delta} must be > 0 (0.1 is the usual value)")


def sample_noise(x0: torch.Tensor, generator: Optional[torch.Generator], cfg: ObjectiveConfig) -> torch.Tensor:
    """Gaussian noise shaped like ``x0`` plus ``noise_offset * N(0, 1)`` per sample and channel (constant over the
    image), which lets the model learn to shift overall brightness (Guttenberg's "offset noise", as kohya does).
    Drawn in float32 on the CPU, then moved to ``x0``'s device and dtype."""
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    if cfg.noise_offset > 0:
        per_channel = (*x0.shape[:2], *([1] * (x0.ndim - 2)))
        noise = noise + cfg.noise_offset * torch.randn(per_channel, generator=generator, dtype=torch.float32)
    return noise.to(device=x0.device, dtype=x0.dtype)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023) for a loss on the given parameterization.

    The paper weights the *x0* error by ``min(SNR, gamma)``. Converting that to the error the model is trained on:
    eps error = x0 error * sqrt(SNR)     -> ``min(SNR, gamma) / SNR``
    v error   = x0 error * sqrt(SNR + 1) -> ``min(SNR, gamma) / (SNR + 1)``
    flow velocity error = x0 error / sigma, with sigma = 1 / (1 + sqrt(SNR)) -> ``min(SNR, gamma) * sigma**2``.
    The flow case is the same principle, not a published recipe: flow trainers (SD3/Flux scripts, kohya, musubi)
    usually leave the loss unweighted and shape the timestep density instead, so prefer gamma = 0 there.
    """
    snr = snr.to(torch.float32)
    capped = torch.minimum(snr, torch.full_like(snr, gamma))
    if prediction == "eps":
        return capped / snr.clamp(min=SNR_FLOOR)
    if prediction == "v":
        return capped / (snr + 1)
    if prediction == "flow":
        return capped / (1 + snr.sqrt()) ** 2
    raise ValueError(f"unknown prediction type {prediction!r}")


def min_snr_applies(cfg: ObjectiveConfig, prediction: str) -> bool:
    """Min-SNR-gamma is defined for eps / v; flow models are trained unweighted, their noise levels shaped by the
    timestep sampling (SD3, Flux and every reference flow trainer), so gamma is not applied to them."""
    return cfg.min_snr_gamma > 0 and prediction in ("eps", "v")


def loss_weights(schedule: "NoiseSchedule", t: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """Per-sample loss weights, float32 ``(B,)`` on ``t``'s device: min-SNR-gamma (eps / v), else ones."""
    if not min_snr_applies(cfg, schedule.prediction):
        return torch.ones(t.shape[0], dtype=torch.float32, device=t.device)
    return min_snr_weights(schedule.snr(t), cfg.min_snr_gamma, schedule.prediction)


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """Unreduced loss in float32.

    ``huber`` is the pseudo-Huber form ``2*d*(sqrt(r**2 + d**2) - d)`` with ``d = huber_delta``: smooth everywhere,
    equal to the squared error r**2 for ``|r| << d`` (so MSE learning rates carry over) and ``2*d*|r|`` (L1-like,
    robust to outliers) for ``|r| >> d``. It is the form kohya uses for its ``huber_c``.
    """
    kind = check_choice("objective.loss", cfg.loss, LOSSES)
    pred, target = pred.float(), target.float()
    if kind == "mse":
        return F.mse_loss(pred, target, reduction="none")
    if kind == "l1":
        return F.l1_loss(pred, target, reduction="none")
    delta = cfg.huber_delta
    if delta <= 0:
        raise ConfigError(f"objective.huber_delta = {delta} must be > 0 (0.1 is the usual value)")
    return 2 * delta * (torch.sqrt((pred - target) ** 2 + delta * delta) - delta)


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """Unweighted loss per sample: the mean over every non-batch dimension, float32 ``(B,)``."""
    return elementwise_loss(pred, target, cfg).flatten(1).mean(dim=1)


def loss(pred: torch.Tensor, target: torch.Tensor, weights: Optional[torch.Tensor], cfg: ObjectiveConfig,
         reduction: str = "mean") -> torch.Tensor:
    """Weighted training loss. ``reduction="mean"``: a scalar ``mean_i(w_i * l_i)``; ``"none"``: the weighted
    per-sample values ``(B,)`` (for logging). The mean divides by B, not by ``sum(w)``: normalising by the weights
    would cancel min-SNR entirely at batch size 1."""
    check_choice("reduction", reduction, REDUCTIONS)
    values = per_sample_loss(pred, target, cfg)
    if weights is not None:
        values = values * weights.to(device=values.device, dtype=values.dtype)
    return values if reduction == "none" else values.mean()
