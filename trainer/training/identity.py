"""Stable identities of models, for cache keys and for checking that a resume uses the same model."""
from __future__ import annotations

import hashlib

SAMPLES_PER_TENSOR = 4096


def module_fingerprint(module, extra: str = "") -> str:
    """Hash of every parameter's name, shape and dtype plus evenly spaced samples of its values.

    Hashing every byte of a multi-GB text encoder would cost seconds at each run; a strided sample of each tensor
    still changes whenever weights are swapped, fine-tuned or merged, which is what a cache key must notice.
    """
    import torch

    digest = hashlib.sha256(extra.encode())
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            if tensor.numel() == 0 or tensor.device.type == "meta":
                continue
            flat = tensor.reshape(-1)
            stride = max(1, flat.numel() // SAMPLES_PER_TENSOR)
            sample = flat[::stride][:SAMPLES_PER_TENSOR].detach().to("cpu", torch.float32).contiguous()
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:24]
