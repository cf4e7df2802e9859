"""Which precision a run computes in, decided from the setting, the model's weight dtype and the device.

The rule (``mixed_precision`` = ``auto``, the default):

* fp32 or bf16 weights: compute in that dtype, no autocast. bf16 has fp32's range, so its gradients do not
  underflow; autocast would only add cast copies.
* fp16 weights (ComfyUI's default for SD1.5/SDXL UNets on NVIDIA GPUs): fp16 autocast plus a gradient scaler. The
  backward pass through frozen fp16 layers runs in fp16, whose smallest normal value is 6e-5: without scaling the
  loss, small gradients flush to zero and the LoRA silently learns less. Autocast to fp16 over fp16 weights casts
  nothing, so no second copy of any weight is kept for the backward pass. bf16 autocast would be cheaper only if
  the weights were bf16 already; over fp16 weights it keeps a bf16 copy of every weight it touches.

Explicit settings: ``bf16`` / ``fp16`` autocast to that dtype (the estimate counts the weight copies this keeps when
the weights are in another dtype); ``no`` computes in the weight dtype without autocast. Whatever is chosen, a
backward pass whose compute dtype is fp16 always gets a gradient scaler: an unscaled fp16 backward never runs.

For models whose weights are stored in fp8 and cast at run time (ComfyUI's manual cast), the host reports the cast
dtype as its ``dtype``; the same rule applies to it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..choices import MIXED_PRECISIONS
from ..errors import ConfigError

NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Precision:
    compute_dtype: torch.dtype  # dtype the denoiser's layers run in
    autocast: Optional[torch.dtype]  # None: no autocast
    grad_scaler: bool
    reason: str

    @property
    def autocast_name(self) -> str:
        """"bf16", "fp16" or "no": the form the memory estimator's trace takes."""
        return NAMES[self.autocast] if self.autocast is not None else "no"

    def describe(self) -> str:
        how = f"{NAMES[self.autocast]} autocast" if self.autocast is not None else f"{NAMES[self.compute_dtype]}"
        if self.grad_scaler:
            how += " with a gradient scaler"
        return f"{how} ({self.reason})"

    def autocast_context(self, device: torch.device):
        return torch.autocast(torch.device(device).type, dtype=self.autocast, enabled=self.autocast is not None)

    def new_grad_scaler(self, device: torch.device):
        return torch.amp.GradScaler(torch.device(device).type) if self.grad_scaler else None


def resolve_precision(setting: str, weight_dtype: torch.dtype, device) -> Precision:
    """The precision for ``mixed_precision = setting`` on a model whose layers compute in ``weight_dtype``."""
    if setting not in MIXED_PRECISIONS:
        raise ConfigError(f"mixed_precision = {setting!r} is not valid; choose one of: {', '.join(MIXED_PRECISIONS)}")
    weights = NAMES.get(weight_dtype, str(weight_dtype).replace("torch.", ""))
    if setting == "auto":
        if weight_dtype == torch.float16:
            return Precision(torch.float16, torch.float16, True,
                             "fp16 weights: the loss is scaled so small gradients do not underflow in fp16")
        return Precision(weight_dtype, None, False, f"the weights are {weights}")
    if setting == "no":
        scaled = weight_dtype == torch.float16
        return Precision(weight_dtype, None, scaled, f"mixed_precision 'no': computed in the {weights} weights' dtype"
                         + ("; fp16 gradients are scaled so they do not underflow" if scaled else ""))
    dtype = torch.bfloat16 if setting == "bf16" else torch.float16
    note = "" if dtype == weight_dtype else f"; the {weights} weights are cast to {setting} (a copy is kept)"
    return Precision(dtype, dtype, dtype == torch.float16, f"mixed_precision '{setting}'{note}")
