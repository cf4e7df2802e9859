"""Identity of a ComfyUI model as training sees it: the base weights before any patch, plus the patches.

ModelPatcher patches weights in place (or swaps in patched tensors) when a model is loaded: after KSampler ran on a
LoRA'd clone, the shared module holds that LoRA's weights until another clone is loaded. Reading the modules as they
are would give a different identity after every generation, so a queued-again graph would retrain from step 0 or
refuse its own resume. The patcher keeps the original of every weight it patched in ``backup`` (shared by all
clones of one model), so the base is read from there, and the input MODEL's own patches (a LoRA loaded in front of
Train LoRA, which training does apply) are hashed on top.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterator

from ..trainer.training.identity import tensor_digest, tensors_fingerprint


def _unpatched_tensors(patcher, module, prefix: str) -> Iterator[tuple[str, Any]]:
    backup = getattr(patcher, "backup", {}) or {}
    for name, tensor in module.state_dict().items():
        saved = backup.get(prefix + name)
        yield name, saved.weight if saved is not None else tensor


def _patch_items(value, digest) -> None:
    """Feed a patch value (adapter objects, ("diff", (tensor,)) tuples, strengths ...) into ``digest``."""
    import torch

    if torch.is_tensor(value):
        tensor_digest(digest, "", value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _patch_items(item, digest)
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            _patch_items(value[key], digest)
    elif hasattr(value, "weights"):  # comfy.weight_adapter adapters (LoRAAdapter, LoHa, ...)
        digest.update(type(value).__name__.encode())
        _patch_items(value.weights, digest)
    elif callable(value):
        digest.update(getattr(value, "__qualname__", type(value).__name__).encode())
    else:
        digest.update(repr(value).encode())


def patches_fingerprint(patcher, prefix: str = "") -> str:
    digest = hashlib.sha256()
    patches = getattr(patcher, "patches", {}) or {}
    for key in sorted(k for k in patches if k.startswith(prefix)):
        digest.update(key.encode())
        _patch_items(patches[key], digest)
    return digest.hexdigest()[:24]


def model_fingerprint(patcher, module, prefix: str, extra: str) -> str:
    """``module`` is ``patcher.model`` or a sub-module of it whose state-dict keys start with ``prefix`` there."""
    base = tensors_fingerprint(_unpatched_tensors(patcher, module, prefix), extra)
    return f"{base}+{patches_fingerprint(patcher, prefix)}"
