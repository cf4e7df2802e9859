"""DoRA: a LoRA whose merged weight is re-normalised column by column and scaled by a trained magnitude.

    W' = (W0 + s * up @ down) * m / ||W0 + s * up @ down||         (norm and m per input column; s = alpha / rank)

Which axis. The DoRA paper's "column-wise norm" is read two ways: per output row (PEFT; LyCORIS >= 3.2 by default)
and per input column (LyCORIS before 3.2, ``wd_on_output=False``). ComfyUI's LoraLoader (comfy/weight_adapter/
base.py ``weight_decompose``, v0.3.64 to at least v0.3.77, and Forge, which copies it) applies an input-column
``dora_scale`` exactly, but divides an output-row one by the norm of the *base* weight instead of the merged one,
so a file trained on the output axis would not reproduce in ComfyUI. We train on the input axis: ``dora_scale`` is
(1, in) for a Linear and (1, in, 1, 1) for a conv, and the file says ``wd_on_output: False`` for LyCORIS.

How, cheaply. Scaling the weight's input columns by ``c = m / ||.||`` is scaling the layer's *input* channels, so
a forward pre-hook hands the target ``x * c`` and the target's own (frozen) weight does the heavy product; the
LoRA part ``s * up(down(x * c))`` is added after. No merged weight is ever built: the column norms come from
``||W0||^2 + 2 s <up^T W0, down> + s^2 <down, (up^T up) down>`` per column, which needs only rank-sized
products with the base weight, so a DoRA step costs about what a LoRA step does and keeps no weight-sized tensor
for backward. The gradient is exact (the norm is not detached). A multiplier (preview strength, ComfyUI's
strength) blends like ComfyUI's: ``W0 + strength * (W' - W0)``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .algorithms import Layout
from .lora import LoRAModule

NORM_EPS = float(torch.finfo(torch.float32).eps)  # what ComfyUI adds to the norm of an fp32 weight


def _flat(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, kk) view of a Linear (kk = 1) or conv weight."""
    return weight.reshape(weight.shape[0], weight.shape[1], -1)


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W[:, i]|| per input channel (over outputs and kernel positions), at least fp32, shape (in,); half-precision
    weights are accumulated in fp32 without an fp32 copy of them."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return torch.linalg.vector_norm(_flat(weight.detach()), dim=(0, 2), dtype=dtype)


class DoRAModule(LoRAModule):
    algorithm = "dora"
    uses_pre_hook = True

    def __init__(self, target: nn.Module, layout: Layout, alpha: Optional[float], dropout: float = 0.0,
                 multiplier: float = 1.0, generator: Optional[torch.Generator] = None):
        super().__init__(target, layout, alpha, dropout, multiplier, generator)
        self._target = (target,)  # a tuple: the base layer must not become a submodule (moved, saved) of ours
        weight = getattr(target, "weight", None)
        with torch.no_grad():
            if weight is None or weight.device.type == "meta":
                magnitude = torch.ones(self.geometry.inp)
            else:
                magnitude = column_norms(weight if weight.element_size() >= 2 else weight.to(torch.bfloat16)).cpu()
        self.dora_scale = nn.Parameter(magnitude.reshape(layout.shapes["dora_scale"]))
        self._pending: Optional[torch.Tensor] = None  # the LoRA part of the current call, from hook_pre to hook_post

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().named_tensors(), "dora_scale": self.dora_scale}

    def _base_weight(self) -> torch.Tensor:
        """The target's weight as its forward uses it (ComfyUI patches an input MODEL's LoRAs in place before
        training), on our device; 8-bit (fp8) weights are read as bf16, since matmuls and norms need >= 16 bits."""
        weight = self._target[0].weight
        if weight.element_size() < 2:
            weight = weight.to(torch.bfloat16)
        return weight if weight.device == self.dora_scale.device else weight.to(self.dora_scale.device)

    def merged_norms(self) -> torch.Tensor:
        """||W0 + s * up @ down|| per input column (at least fp32, shape (in,)), from rank-sized products only."""
        w0 = self._base_weight()
        work = torch.promote_types(self.lora_up.weight.dtype, torch.float32)
        with torch.autocast(w0.device.type, enabled=False):
            up = self.lora_up.weight.to(work).flatten(1)  # (out, r)
            rank = up.shape[1]
            down = self.lora_down.weight.to(work).reshape(rank, -1)  # (r, in * kk)
            s = self.scale
            base = column_norms(w0).to(work).square()
            flat = w0.detach().reshape(w0.shape[0], -1)
            cross = (up.t().to(flat.dtype) @ flat).to(work) * down  # saves the weight itself, not a copy of it
            quad = down * ((up.t() @ up) @ down)
            per_column = (2 * s * cross + s * s * quad).reshape(rank, self.geometry.inp, -1).sum(dim=(0, 2))
            return (base + per_column).clamp_min(0).sqrt() + NORM_EPS

    def column_scale(self) -> torch.Tensor:
        """m / ||W0 + s * up @ down||, shape (in,)."""
        return self.dora_scale.reshape(-1) / self.merged_norms()

    def _channels(self, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return c.reshape(1, -1, *([1] * (x.ndim - 2))) if self.geometry.is_conv else c

    def hook_pre(self, x: torch.Tensor) -> torch.Tensor:
        c = self._channels(self.column_scale(), x)
        xw = x.to(torch.promote_types(x.dtype, c.dtype))  # half-precision inputs are scaled in fp32
        scaled = xw * c
        lora = self.lora_up(self.lora_down(self.dropout(scaled.to(self.lora_down.weight.dtype)))) * self.scale
        if self.multiplier == 1:
            self._pending = lora
            return scaled.to(x.dtype)
        self._pending = lora * self.multiplier
        return (xw * (1 + self.multiplier * (c - 1))).to(x.dtype)

    def hook_post(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        pending, self._pending = self._pending, None
        if pending is None:  # called without hook_pre (never by the network's hooks)
            raise RuntimeError("DoRA adapter: the forward pre-hook did not run")
        return output + pending.to(output.dtype)

    def release(self) -> None:
        self._pending = None  # a call that failed between the hooks must not keep its graph alive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a DoRA adapter changes its layer's input and output; attach it with the network's hooks")

    def delta_weight(self) -> torch.Tensor:
        """multiplier * (W' - W0), fp32, built in full (for tests and inspection; training never builds it)."""
        w0 = self._base_weight().float()
        merged = w0 + self.lora_delta()
        norms = column_norms(merged) + NORM_EPS
        c = self.dora_scale.float().reshape(-1) / norms
        shape = (1, -1) + (1,) * (w0.ndim - 2)
        return (merged * c.reshape(shape) - w0) * self.multiplier
