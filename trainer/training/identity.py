"""Stable identities: of models (for cache keys), and of a training run (to find it again and to decide whether a
saved state may be resumed).

A run is identified by three parts, kept apart so a refusal can say which one changed:

* ``model``: the base weights before any patch, the patches on the input model (e.g. a LoRA loaded in front of
  Train LoRA), the text encoder(s) and the noise schedule the model samples with (prediction type included);
* ``settings``: every training setting that changes the result. Settings that do not (how many steps, how often
  to save, how many snapshots to keep, the saved file's dtype, gradient checkpointing, previews) are left out, so
  changing them never starts a new run: more steps continue it, and checkpointing can be switched on to resume a run
  that ran out of memory;
* ``data``: the cached latents (which cover the images, buckets, crops and the VAE), captions and caption options.

``RunIdentity.key`` (all three) names the run folder. A resume needs the same model and settings; resuming onto
changed data is allowed, and reported (``differences``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

SAMPLES_PER_TENSOR = 4096
# Settings that never change what a run computes up to a given step (see the module docstring).
RESULT_NEUTRAL = ("steps", "save_every", "keep_last", "output_dtype", "gradient_checkpointing")


def tensor_digest(digest, name: str, tensor) -> None:
    """Feed a tensor's name, shape, dtype and evenly spaced samples of its values into ``digest``.

    Hashing every byte of a multi-GB model would cost seconds at each run; a strided sample of each tensor still
    changes whenever weights are swapped, fine-tuned or merged, which is what an identity must notice."""
    import torch

    digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return
    with torch.no_grad():
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        sample = flat[::stride][:SAMPLES_PER_TENSOR].to("cpu", torch.float32).contiguous()
        digest.update(sample.numpy().tobytes())


def tensors_fingerprint(named_tensors: Iterable[tuple[str, Any]], extra: str = "") -> str:
    digest = hashlib.sha256(extra.encode())
    for name, tensor in named_tensors:
        tensor_digest(digest, name, tensor)
    return digest.hexdigest()[:24]


def module_fingerprint(module, extra: str = "") -> str:
    """Fingerprint of every parameter and buffer of ``module`` (see :func:`tensor_digest`)."""
    return tensors_fingerprint(module.state_dict().items(), extra)


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:24]


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def settings_digest(cfg) -> str:
    """The training settings that change the result. A LoRA to continue from counts by its content, not its path."""
    data = cfg.to_dict()
    for key in RESULT_NEUTRAL:
        data.pop(key, None)
    init_from = data["network"].get("init_from")
    if init_from:
        data["network"]["init_from"] = file_digest(init_from) if Path(init_from).is_file() else f"missing:{init_from}"
    return _hash(data)


def data_digest(samples, dataset_cfg) -> str:
    """The cached latents themselves (they cover the images, buckets, crops and the VAE), captions and repeats, and
    where a sample has them (combined datasets) its own caption options and loss weight."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(dataset_cfg), sort_keys=True).encode())
    for s in samples:
        digest.update(f"{s.content_hash}|{s.bucket}|{s.crop_top_left}|{s.caption}|{s.repeats}|{s.resolution}".encode())
        options, weight = getattr(s, "caption_options", None), float(getattr(s, "loss_weight", 1.0))
        if options is not None or weight != 1.0:  # absent for a single dataset: its runs keep their keys
            own = dataclasses.asdict(options) if options is not None else None
            digest.update(json.dumps({"caption_options": own, "loss_weight": weight}, sort_keys=True).encode())
        digest.update(s.latent.float().numpy().tobytes())
        if s.latent_flipped is not None:
            digest.update(s.latent_flipped.float().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_digest(host) -> str:
    """The denoiser (base weights + patches, as the host reports them), text encoders and noise schedule."""
    return _hash([host.model_id, host.text_encoder_id, host.schedule.identity()])


@dataclass(frozen=True)
class RunIdentity:
    model: str
    settings: str
    data: str

    @classmethod
    def of(cls, host, cfg, samples, dataset_cfg) -> "RunIdentity":
        return cls(model_digest(host), settings_digest(cfg), data_digest(samples, dataset_cfg))

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.model}|{self.settings}|{self.data}".encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Optional[dict]) -> Optional["RunIdentity"]:
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("model", "settings", "data")):
            return None
        return cls(data["model"], data["settings"], data["data"])

    def differences(self, other: "RunIdentity") -> list[str]:
        """The parts ("model", "settings", "data") in which ``other`` differs from this identity."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]
