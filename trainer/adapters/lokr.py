"""LoKr (LyCORIS): the weight change is a Kronecker product ``kron(w1, w2) * scale`` of a small full-rank factor
``lokr_w1`` (out_l x in_m) and a large one ``w2`` (out_k x in_n, per kernel position for convs) that is either a
rank-r pair ``lokr_w2_a @ lokr_w2_b`` (scale alpha / r) or, with ``lokr_full_matrix``, one full matrix (scale 1).

The product is never built. With the input's channels split as (in_m, in_n), a Kronecker-structured layer is
``w1 @ X @ w2^T`` per sample (a Linear), or ``w2`` convolved over each of the in_m channel groups and the groups
mixed by ``w1`` (a conv), so a LoKr forward costs a fraction (1 / out_l) of the base layer's.
Initialised like a LoRA: w1 and w2_b kaiming-uniform, w2_a (or the full w2) zero, so the start changes nothing and
the zero factor is the up/B one LoRA+ speeds up. (LyCORIS zeroes w2_b instead; the files are read the same way.)
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .algorithms import Layout
from .lora import AdapterModule
from .weight_op import LayerOp


class LoKrModule(AdapterModule):
    algorithm = "lokr"

    def __init__(self, target: nn.Module, layout: Layout, alpha: Optional[float], dropout: float = 0.0,
                 multiplier: float = 1.0, generator: Optional[torch.Generator] = None):
        super().__init__(target, layout, alpha, dropout, multiplier)
        self.op = LayerOp.of(target)
        (self.out_l, self.out_k), (self.in_m, self.in_n) = layout.split
        self.full = layout.full_matrix
        self.lokr_w1 = nn.Parameter(torch.empty(layout.shapes["lokr_w1"]))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5), generator=generator)
        if self.full:
            self.lokr_w2 = nn.Parameter(torch.zeros(layout.shapes["lokr_w2"]))
        else:
            self.lokr_w2_a = nn.Parameter(torch.zeros(layout.shapes["lokr_w2_a"]))
            self.lokr_w2_b = nn.Parameter(torch.empty(layout.shapes["lokr_w2_b"]))
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.lokr_w2_b, a=math.sqrt(5), generator=generator)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        if self.full:
            return {"lokr_w1": self.lokr_w1, "lokr_w2": self.lokr_w2}
        return {"lokr_w1": self.lokr_w1, "lokr_w2_a": self.lokr_w2_a, "lokr_w2_b": self.lokr_w2_b}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._input(x)
        scale = self.scale * self.multiplier
        if not self.geometry.is_conv:
            grouped = x.reshape(*x.shape[:-1], self.in_m, self.in_n)
            if self.full:
                h = grouped @ self.lokr_w2.t()
            else:
                h = (grouped @ self.lokr_w2_b.t()) @ self.lokr_w2_a.t()  # (..., in_m, out_k)
            y = self.lokr_w1 @ h  # (..., out_l, out_k)
            return y.reshape(*x.shape[:-1], self.geometry.out) * scale
        x = self.op.prepare(x)
        n, _, height, width = x.shape
        kh, kw = self.geometry.kernel
        grouped = x.reshape(n * self.in_m, self.in_n, height, width)
        if self.full:
            h = self.op(grouped, self.lokr_w2)
        else:
            h = self.op(grouped, self.lokr_w2_b.reshape(-1, self.in_n, kh, kw))
            h = F.conv2d(h, self.lokr_w2_a.reshape(self.out_k, -1, 1, 1))
        h = h.reshape(n, self.in_m, self.out_k, *h.shape[-2:])
        y = torch.einsum("lm,nmkhw->nlkhw", self.lokr_w1, h)
        return y.reshape(n, self.geometry.out, *h.shape[-2:]) * scale

    def delta_weight(self) -> torch.Tensor:
        """kron(w1, w2) * scale * multiplier, fp32, in the target's weight shape (what readers build)."""
        with torch.no_grad():
            w1 = self.lokr_w1.float()
            w2 = self.lokr_w2.float() if self.full else self.lokr_w2_a.float() @ self.lokr_w2_b.float()
            if w2.ndim == 4:
                w1 = w1[:, :, None, None]
            shape = (self.geometry.out, self.geometry.inp, *self.geometry.kernel)
            return torch.kron(w1, w2).reshape(shape) * (self.scale * self.multiplier)
