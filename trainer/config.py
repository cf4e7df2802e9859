"""Training configuration: plain dataclasses, one per concern, built by the nodes or read from JSON/YAML.

The same structure drives the ComfyUI nodes (Configure LoRA builds it), the headless CLI (``--config FILE``),
run folders (saved as ``config.json``) and LoRA metadata. No torch import here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError


@dataclass
class DatasetConfig:
    folder: str = ""
    caption_extension: str = ".txt"
    trigger_word: str = ""  # inserted at the front of captions that lack it
    default_repeats: int = 1  # for images not inside a kohya "N_name" folder
    shuffle_captions: bool = False  # shuffle tags split by `caption_separator`, keeping the first `keep_tokens`
    keep_tokens: int = 0
    caption_separator: str = ","
    caption_dropout: float = 0.0  # probability of training a sample with an empty caption


@dataclass
class BucketConfig:
    resolutions: list[int] = field(default_factory=lambda: [512])  # several = multi-resolution training
    min_bucket: int = 256
    max_bucket: int = 1024
    step: int = 64
    no_upscale: bool = False
    crop: str = "center"  # "center" | "random"
    flip: bool = False  # also cache a horizontally flipped copy, picked at random per step


@dataclass
class NetworkConfig:
    rank: int = 16
    alpha: float = 16.0  # scale = alpha / rank; alpha == rank -> scale 1
    dropout: float = 0.0
    targets: str = "transformer"  # which layers carry adapters: "attention" | "transformer" | "full"
    conv_rank: int = 0  # rank of the 3x3 conv (LoCon) adapters that targets "full" adds; 0 = same as rank
    conv_alpha: float = 1.0  # used with conv_rank > 0
    train_text_encoder: bool = False
    init_from: str = ""  # an existing LoRA file to continue training
    algorithm: str = "lora"  # "lora" | "loha" | "lokr" | "dora" (trainer/adapters/algorithms.py)
    lokr_factor: int = -1  # LoKr: size of the small Kronecker side (-1: the most balanced split of each layer)
    lokr_full_matrix: bool = False  # LoKr: the large side as one full matrix instead of a rank-`rank` pair


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | adamw8bit | lion8bit | adafactor | sgd
    learning_rate: float = 1e-4
    text_encoder_lr: Optional[float] = None  # None -> same as learning_rate
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9  # SGD
    scheduler: str = "constant_with_warmup"
    warmup_steps: int = 0
    num_cycles: int = 1  # cosine_with_restarts
    power: float = 1.0  # polynomial
    max_grad_norm: float = 1.0  # 0 disables clipping
    grad_accumulation: int = 1
    # LoRA+: the up/B factors train at learning_rate x this (0 = off; 16 is the paper's and kohya's usual value).
    # An optimizer setting: it changes learning rates only, not what the network or its file holds.
    loraplus_lr_ratio: float = 0.0


@dataclass
class ObjectiveConfig:
    timestep_sampling: str = "auto"  # auto (the family's recipe) | uniform | logit_normal | shifted | flux_shift
    logit_mean: float = 0.0
    logit_std: float = 1.0
    flow_shift: float = 3.0
    min_snr_gamma: float = 0.0  # 0 disables min-SNR weighting; 5 is the usual value
    noise_offset: float = 0.0
    loss: str = "mse"  # mse | huber | l1
    huber_delta: float = 0.1


@dataclass
class TrainConfig:
    steps: int = 500
    batch_size: int = 1
    seed: int = 0
    mixed_precision: str = "auto"  # auto | bf16 | fp16 | no (trainer/training/precision.py)
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0  # 0 disables EMA of adapter weights
    save_every: int = 0  # 0 disables periodic saves
    keep_last: int = 3
    output_dtype: str = "fp16"  # fp16 | bf16 | fp32
    clip_skip: int = 1
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A stable hash of every setting: run folders and the "already trained" lookup use it."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=list).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return _build(cls, data, "")


RENAMED = {"network.preset": "network.targets"}  # old config files get told the new name


def _build(kind, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"setting '{where or 'config'}' must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - set(fields))
    renamed = [(where + k, RENAMED[where + k]) for k in unknown if where + k in RENAMED]
    if renamed:
        raise ConfigError("; ".join(f"setting {old} is now called {new}" for old, new in renamed))
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(where + k for k in unknown)}; known: {', '.join(sorted(fields))}"
        )
    values = {}
    for name, value in data.items():
        f = fields[name]
        nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if nested is not None and dataclasses.is_dataclass(nested):
            values[name] = _build(nested, value, f"{where}{name}.")
        elif name == "betas":
            values[name] = tuple(float(v) for v in value)
        else:
            values[name] = value
    return kind(**values)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML config file into a dict (YAML needs PyYAML, which ComfyUI already ships)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:  # pragma: no cover - PyYAML ships with ComfyUI
            raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use JSON") from e
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return data
