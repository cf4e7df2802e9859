"""``op(x, delta(params))`` for adapters whose weight change has no cheap factored form (LoHa), without keeping the
weight-sized ``delta`` alive until backward.

Autograd through ``F.linear(x, delta(params))`` would save ``delta`` (and, for LoHa, both factor products) per
adapted layer: three fp32 copies of every adapted weight held through the backward pass, more than the model itself.
:class:`DeltaOp` saves only ``x`` and the small factors and rebuilds ``delta`` in backward, one layer at a time:
the cost is one extra rank-sized product per layer, the saving every weight-sized tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LayerOp:
    """How the target applies a weight: a Linear, or a conv with its stride / padding / dilation."""

    conv: bool
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    pad: Optional[tuple] = None  # non-"zeros" padding modes: F.pad amounts, applied before the op
    pad_mode: str = "zeros"

    @classmethod
    def of(cls, target: nn.Module) -> "LayerOp":
        if not isinstance(target, nn.Conv2d):
            return cls(conv=False)
        if target.padding_mode != "zeros":  # nn.Conv2d pads explicitly for these modes, then convolves unpadded
            return cls(True, tuple(target.stride), (0, 0), tuple(target.dilation),
                       tuple(target._reversed_padding_repeated_twice), target.padding_mode)
        return cls(True, tuple(target.stride), tuple(target.padding), tuple(target.dilation))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad, mode=self.pad_mode) if self.pad is not None else x

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.conv:
            return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation)
        return F.linear(x, weight)

    def grad_input(self, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        if self.conv:
            return torch.nn.grad.conv2d_input(x.shape, weight, grad, self.stride, self.padding, self.dilation)
        return grad @ weight

    def grad_weight(self, x: torch.Tensor, weight_shape, grad: torch.Tensor) -> torch.Tensor:
        if self.conv:
            return torch.nn.grad.conv2d_weight(x, weight_shape, grad, self.stride, self.padding, self.dilation)
        return grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


class DeltaOp(torch.autograd.Function):
    """``op(x, make(*params))``, rebuilding ``make(*params)`` in backward instead of saving it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, op: LayerOp, make: Callable[..., torch.Tensor], *params: torch.Tensor):
        with torch.no_grad():
            delta = make(*params)
        ctx.op, ctx.make = op, make
        ctx.save_for_backward(x, *params)
        return op(x, delta)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, *params = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(True) for p in params]
            delta = ctx.make(*leaves)
        # Under autocast the forward op ran in the autocast dtype; the gradient arrives in it: compute in it too.
        work = grad.dtype
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.op.grad_input(x, delta.detach().to(work), grad).to(x.dtype)
        grad_delta = ctx.op.grad_weight(x.to(work), delta.shape, grad).to(delta.dtype)
        grads = torch.autograd.grad(delta, leaves, grad_delta, allow_unused=True)
        return (grad_x, None, None, *grads)
