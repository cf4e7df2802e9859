"""The LoRA file: kohya-format safetensors with kohya ``ss_*`` metadata, ``modelspec.*`` and our config.

The tensors are whatever the network's algorithm stores (LoRA / DoRA: ``lora_down/lora_up`` (+ ``dora_scale``);
LoHa: ``hada_w*``; LoKr: ``lokr_w*``; all: ``alpha``; trainer/adapters/algorithms.py), under kohya names.

Written atomically (temp file + rename). Weights are stored in the chosen dtype, alphas as fp32 0-dim tensors
(every reader takes ``.item()``, and fp32 keeps odd alphas exact). ``sshs_model_hash`` / ``sshs_legacy_hash`` are
computed as kohya does, on a re-serialisation holding the tensors and only the ``ss_*`` metadata, so editing the
title or description later does not change them (A1111's "addnet" hash of the saved file equals
``sshs_model_hash``).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from ..adapters.algorithms import network_args as network_args_of
from ..adapters.algorithms import network_module
from ..config import TrainConfig
from ..errors import TrainingError
from ..families import FAMILIES
from .atomic import write_with

if TYPE_CHECKING:  # torch is imported where it is used
    import torch

DTYPE_NAMES = ("fp16", "bf16", "fp32")
IMPLEMENTATIONS = {"sd15": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models"}
CONFIG_KEY = "loralab_config"


class LoRAFileError(TrainingError):
    """A LoRA file cannot be read or written. The message names the file."""


def _torch_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise ValueError(f"unknown save dtype '{dtype}' (use one of: {', '.join(DTYPE_NAMES)})")
    return table[dtype]


def _as_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _prepare(state_dict: Mapping[str, "torch.Tensor"], dtype) -> dict:
    import torch

    out = {}
    for key, tensor in sorted(state_dict.items()):
        tensor = tensor.detach().to("cpu")
        if key.endswith(".alpha"):
            tensor = tensor.to(torch.float32).reshape(())
        elif tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[key] = tensor.contiguous()
    return out


def kohya_hashes(tensors: Mapping[str, "torch.Tensor"], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya computes them: serialise the tensors with only the ss_* metadata;
    the model hash is the sha256 of everything after the header, the legacy hash the first 8 hex digits of the
    sha256 of the 64 KiB at offset 1 MiB."""
    from safetensors.torch import save

    data = save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def save_lora(path: Union[str, Path], state_dict: Mapping[str, "torch.Tensor"],
              metadata: Optional[Mapping[str, Any]] = None, dtype="fp16", add_hashes: bool = True) -> Path:
    """Write a kohya-format LoRA atomically. Returns the path. Metadata values are stored as strings."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = _prepare(state_dict, _torch_dtype(dtype))
    meta = {str(k): _as_str(v) for k, v in (metadata or {}).items()}
    if add_hashes:
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = kohya_hashes(tensors, meta)
    try:
        write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    except OSError as e:
        raise LoRAFileError(f"could not write the LoRA file '{path}': {e}") from e
    return path


def holds_same_lora(path: Union[str, Path], state_dict: Mapping[str, "torch.Tensor"],
                    metadata: Optional[Mapping[str, Any]] = None, dtype="fp16") -> bool:
    """Would ``save_lora(path, state_dict, metadata, dtype)`` write what ``path`` already holds? The same weights
    and kohya metadata (its ``sshs_model_hash``) and the same title, trigger phrase and description; only the
    date may differ. False for a missing or unreadable file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            existing = dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - unreadable: not the same
        return False
    meta = {str(k): _as_str(v) for k, v in (metadata or {}).items()}
    model_hash, _ = kohya_hashes(_prepare(state_dict, _torch_dtype(dtype)), meta)
    shown = ("modelspec.title", "modelspec.trigger_phrase", "modelspec.description")
    return existing.get("sshs_model_hash") == model_hash and all(existing.get(k) == meta.get(k) for k in shown)


def load_lora(path: Union[str, Path]) -> tuple[dict[str, "torch.Tensor"], dict[str, str]]:
    """Read a .safetensors LoRA: (state dict, metadata). Missing, unreadable or corrupt files raise
    :class:`LoRAFileError` naming the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise LoRAFileError(f"LoRA file not found: '{path}'")
    if not path.is_file():
        raise LoRAFileError(f"'{path}' is not a file; expected a .safetensors LoRA")
    if path.suffix.lower() != ".safetensors":
        raise LoRAFileError(f"'{path}': only .safetensors LoRA files are supported (convert .pt/.ckpt first)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state_dict = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise LoRAFileError(f"'{path}' is not a readable LoRA file (truncated or corrupt?): {e}") from e
    if not state_dict:
        raise LoRAFileError(f"'{path}' holds no tensors")
    return state_dict, metadata


def _resolution(resolution) -> tuple[int, int]:
    if isinstance(resolution, (list, tuple)):
        width, height = (int(resolution[0]), int(resolution[1])) if len(resolution) > 1 else (int(resolution[0]),) * 2
        return width, height
    return int(resolution), int(resolution)


def _timestamp(value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        return value.timestamp()
    return float(value)


def build_metadata(config: TrainConfig, family: str, prediction: str, resolution: Union[int, tuple, list],
                   title: str = "", trigger_phrase: str = "", notes: str = "", extra: Optional[Mapping] = None, *,
                   steps: Optional[int] = None, started_at=None, finished_at=None,
                   num_train_images: Optional[int] = None, bucket_info: Any = None,
                   tag_frequency: Any = None) -> dict[str, str]:
    """kohya ``ss_*`` keys that apply, ``modelspec.*`` and our full config (JSON under ``loralab_config``).

    ``steps``: optimizer steps actually done (default: config.steps). ``started_at``/``finished_at``: epoch seconds
    or datetimes. ``extra`` entries are added last (non-strings JSON-encoded) and may override anything.
    """
    if family not in FAMILIES:
        raise ValueError(f"no LoRA metadata rule for model family '{family}' (supported: {', '.join(FAMILIES)})")
    base_version, architecture = FAMILIES[family].base_version, FAMILIES[family].architecture + "/lora"
    implementation = IMPLEMENTATIONS.get(family, "https://github.com/comfyanonymous/ComfyUI")
    net, opt, obj = config.network, config.optimizer, config.objective
    width, height = _resolution(resolution)
    te_lr = (opt.text_encoder_lr if opt.text_encoder_lr is not None else opt.learning_rate)
    finished = _timestamp(finished_at)
    date = (_dt.datetime.fromtimestamp(finished) if finished is not None else _dt.datetime.now()).astimezone()

    # LoHa, LoKr and DoRA are LyCORIS files: module "lycoris.kohya", the algorithm in ss_network_args as LyCORIS
    # reads it ({"algo": "loha"}, ...); plain LoRA is kohya's own "networks.lora".
    network_args: dict[str, str] = {**network_args_of(net.algorithm, net.lokr_factor, net.lokr_full_matrix),
                                    "targets": net.targets}
    if net.targets == "full":  # 3x3 convs carry adapters: tell kohya-aware tools their rank/alpha
        conv = net.conv_rank > 0
        network_args["conv_dim"] = str(net.conv_rank if conv else net.rank)
        network_args["conv_alpha"] = str(net.conv_alpha if conv else net.alpha)
    if net.dropout:
        network_args["dropout_on_input"] = str(net.dropout)
    if opt.loraplus_lr_ratio:
        network_args["loraplus_lr_ratio"] = str(opt.loraplus_lr_ratio)  # where kohya records LoRA+

    meta: dict[str, Any] = {
        "ss_network_module": network_module(net.algorithm),
        "ss_network_dim": net.rank,
        "ss_network_alpha": net.alpha,
        "ss_network_dropout": net.dropout,
        "ss_network_args": json.dumps(network_args),
        "ss_base_model_version": base_version,
        "ss_v2": False,
        "ss_output_name": title,
        "ss_training_comment": notes,
        "ss_learning_rate": opt.learning_rate,
        "ss_unet_lr": opt.learning_rate,
        "ss_text_encoder_lr": te_lr if net.train_text_encoder else 0.0,  # 0: text encoder not trained
        "ss_optimizer": f"{opt.name}(weight_decay={opt.weight_decay},betas={tuple(opt.betas)},eps={opt.eps})",
        "ss_lr_scheduler": opt.scheduler,
        "ss_lr_warmup_steps": opt.warmup_steps,
        "ss_max_grad_norm": opt.max_grad_norm,
        "ss_gradient_accumulation_steps": opt.grad_accumulation,
        "ss_gradient_checkpointing": config.gradient_checkpointing,
        "ss_mixed_precision": config.mixed_precision,
        "ss_steps": config.steps if steps is None else steps,
        "ss_max_train_steps": config.steps,
        "ss_batch_size_per_device": config.batch_size,
        "ss_total_batch_size": config.batch_size * opt.grad_accumulation,
        "ss_resolution": f"({width}, {height})",
        "ss_seed": config.seed,
        "ss_clip_skip": config.clip_skip,
        "ss_min_snr_gamma": obj.min_snr_gamma if obj.min_snr_gamma else None,  # kohya writes "None" when off
        "ss_noise_offset": obj.noise_offset,
        "ss_loss_type": {"mse": "l2"}.get(obj.loss, obj.loss),  # kohya's name for MSE is "l2"
    }
    if obj.loss == "huber":
        meta["ss_huber_c"] = obj.huber_delta
    if started_at is not None:
        meta["ss_training_started_at"] = _timestamp(started_at)
    if finished is not None:
        meta["ss_training_finished_at"] = finished
    if num_train_images is not None:
        meta["ss_num_train_images"] = num_train_images
    if bucket_info is not None:
        meta["ss_bucket_info"] = bucket_info
    if tag_frequency is not None:
        meta["ss_tag_frequency"] = tag_frequency

    meta.update({
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title or f"LoRA@{date.strftime('%Y-%m-%d %H:%M:%S')}",
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": date.isoformat(timespec="seconds"),
        "modelspec.prediction_type": {"v": "v", "v_prediction": "v", "flow": "flow"}.get(prediction, "epsilon"),
    })
    if trigger_phrase:
        meta["modelspec.trigger_phrase"] = trigger_phrase
    if notes:
        meta["modelspec.description"] = notes
    meta[CONFIG_KEY] = json.dumps(config.to_dict(), sort_keys=True)
    meta.update(extra or {})
    return {key: _as_str(value) for key, value in meta.items()}
