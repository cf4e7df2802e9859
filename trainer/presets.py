"""Named starting points for common cases (Configure LoRA's `preset`). Each overrides only the listed settings."""
from __future__ import annotations

import dataclasses

from .adapters.algorithms import NAMES as ALGORITHM_NAMES
from .choices import PRESETS as PRESET_NAMES
from .config import TrainConfig
from .errors import ConfigError

PRESETS: dict[str, dict] = {
    "custom": {},
    # A person or object: attention + feed-forward of transformer blocks, moderate rank, min-SNR for stability.
    "character": {"network": {"rank": 16, "alpha": 16, "targets": "transformer"},
                  "optimizer": {"name": "adamw", "learning_rate": 1e-4, "scheduler": "cosine", "warmup_steps": 50},
                  "objective": {"min_snr_gamma": 5.0}},
    # A look: also the resnet convs (LoCon), where texture and colour live.
    "style": {"network": {"rank": 32, "alpha": 16, "targets": "full", "conv_rank": 16, "conv_alpha": 8},
              "optimizer": {"name": "adamw", "learning_rate": 1e-4, "scheduler": "cosine", "warmup_steps": 50},
              "objective": {"min_snr_gamma": 5.0}},
    # Smallest footprint that still trains well: factored optimizer state, recomputed activations, and the
    # precision auto picks (fp16 weights: fp16 compute, no cast copies; bf16 autocast would copy fp16 weights).
    "low memory": {"network": {"rank": 8, "alpha": 8, "targets": "attention"},
                   "optimizer": {"name": "adafactor", "learning_rate": 2e-4},
                   "gradient_checkpointing": True, "mixed_precision": "auto"},
}
assert tuple(PRESETS) == PRESET_NAMES, "trainer/choices.py lists the presets the node offers"


def apply_preset(config: TrainConfig, name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    data = config.to_dict()
    for key, value in PRESETS[name].items():
        if isinstance(value, dict):
            data[key].update(value)
        else:
            data[key] = value
    return TrainConfig.from_dict(data)


def describe(config: TrainConfig) -> str:
    """A compact, readable summary of the effective settings (shown on the Configure LoRA node)."""
    n, o, j = config.network, config.optimizer, config.objective
    algorithm = ALGORITHM_NAMES.get(n.algorithm, n.algorithm)
    if n.algorithm == "lokr":
        factor = "balanced split" if n.lokr_factor == -1 else f"factor {n.lokr_factor}"
        shape = (f"LoKr full matrix ({factor})" if n.lokr_full_matrix else
                 f"LoKr rank {n.rank}, alpha {n.alpha:g} (scale {n.alpha / n.rank:.3g}), {factor}")
    else:
        shape = f"{algorithm} rank {n.rank}, alpha {n.alpha:g} (scale {n.alpha / n.rank:.3g})"
    lines = [
        f"network: {shape}, targets '{n.targets}'"
        + (f", conv rank {n.conv_rank}" if n.conv_rank else "") + (", + text encoder" if n.train_text_encoder else ""),
        f"optimizer: {o.name}, lr {o.learning_rate:g}"
        + (f" (text encoder {o.text_encoder_lr:g})" if o.text_encoder_lr is not None else "")
        + (f", LoRA+ ratio {o.loraplus_lr_ratio:g}" if o.loraplus_lr_ratio else "")
        + f", {o.scheduler}, warmup {o.warmup_steps}, weight decay {o.weight_decay:g}",
        f"objective: {j.loss} loss, timesteps {j.timestep_sampling}"
        + (f", min-SNR {j.min_snr_gamma:g}" if j.min_snr_gamma else "")
        + (f", noise offset {j.noise_offset:g}" if j.noise_offset else ""),
        f"precision: {config.mixed_precision}, gradient checkpointing {'on' if config.gradient_checkpointing else 'off'}"
        + (f", EMA {config.ema_decay:g}" if config.ema_decay else ""),
    ]
    if n.init_from:
        lines.append(f"continues from: {n.init_from} (its rank and alpha are kept)")
    return "\n".join(lines)


def replace(config: TrainConfig, **changes) -> TrainConfig:
    return dataclasses.replace(config, **changes)
