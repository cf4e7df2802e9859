"""LoHa (LyCORIS): the Hadamard product of two low-rank pairs, ``(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank``.

Two rank-r pairs multiplied element-wise reach rank r^2 with the parameters of a rank-2r LoRA. That product has no
cheap factored form, so each forward builds the layer's weight change and applies it with the layer's own op
(:class:`~trainer.adapters.weight_op.DeltaOp`, which rebuilds it in backward rather than keeping it): a LoHa step
costs about one extra weight-sized product per adapted layer over LoRA's rank-sized ones.
Initialised as LyCORIS does: w1_a ~ N(0, 0.1), w1_b and w2_b ~ N(0, 1), w2_a = 0, so the start changes nothing.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .algorithms import Layout
from .lora import AdapterModule
from .weight_op import DeltaOp, LayerOp


class LoHaModule(AdapterModule):
    algorithm = "loha"

    def __init__(self, target: nn.Module, layout: Layout, alpha: Optional[float], dropout: float = 0.0,
                 multiplier: float = 1.0, generator: Optional[torch.Generator] = None):
        super().__init__(target, layout, alpha, dropout, multiplier)
        self.op = LayerOp.of(target)
        self.weight_shape = (self.geometry.out, self.geometry.inp, *self.geometry.kernel)
        for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            setattr(self, name, nn.Parameter(torch.empty(layout.shapes[name])))
        with torch.no_grad():
            self.hada_w1_a.normal_(0.0, 0.1, generator=generator)
            self.hada_w1_b.normal_(0.0, 1.0, generator=generator)
            self.hada_w2_a.zero_()
            self.hada_w2_b.normal_(0.0, 1.0, generator=generator)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {"hada_w1_a": self.hada_w1_a, "hada_w1_b": self.hada_w1_b,
                "hada_w2_a": self.hada_w2_a, "hada_w2_b": self.hada_w2_b}

    def _make(self, w1a, w1b, w2a, w2b) -> torch.Tensor:
        return ((w1a @ w1b) * (w2a @ w2b) * (self.scale * self.multiplier)).reshape(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.op.prepare(self._input(x))
        return DeltaOp.apply(x, self.op, self._make, self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)

    def delta_weight(self) -> torch.Tensor:
        with torch.no_grad():
            return self._make(*(t.float() for t in self.named_tensors().values()))
