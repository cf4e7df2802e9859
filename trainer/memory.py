"""DRAFT"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Optional

TRACE_SIDES = (8, 16, 24)  # latent sides of the small trace forwards (multiples of 8: every UNet level divides)


# ------------------------------------------------------------------------------------------------ the trace
@dataclass
class _Trace:
    """Saved-for-backward bytes of one small forward, by module path (innermost module running at save time)."""
    by_module: dict[str, int] = field(default_factory=dict)
    region_of: dict[str, int] = field(default_factory=dict)  # module path -> checkpoint region (ckpt traces)
    total: int = 0


class _Adapters:
    """Temporary LoRA-shaped forward hooks that do what trainer/network.py does (fp32 adapters, the hook adds
    ``up(down(dropout(x.float()))) * scale`` to the target output), so autograd saves the same tensors."""

    def __init__(self, targets, ranks, dropout: float):
        self.targets, self.ranks, self.dropout = targets, ranks, dropout
        self.handles = []
        self.params = []

    def __enter__(self):
        import torch
        import torch.nn.functional as F
        from torch import nn

        for target, rank in zip(self.targets, self.ranks):
            module = target.module
            if rank <= 0:
                continue
            dev = module.weight.device
            if isinstance(module, nn.Conv2d):
                down = torch.zeros(rank, module.in_channels, *module.kernel_size, device=dev, requires_grad=True)
                up = torch.zeros(module.out_channels, rank, 1, 1, device=dev, requires_grad=True)

                def delta(x, down=down, up=up, m=module):
                    h = F.conv2d(x, down, None, m.stride, m.padding, m.dilation)
                    return F.conv2d(h, up)
            else:
                down = torch.zeros(rank, module.in_features, device=dev, requires_grad=True)
                up = torch.zeros(module.out_features, rank, device=dev, requires_grad=True)

                def delta(x, down=down, up=up):
                    return F.linear(F.linear(x, down), up)

            p = self.dropout

            def hook(_m, args, kwargs, output, delta=delta, p=p):
                x = args[0] if args else next(iter(kwargs.values()))
                x = x.to(torch.float32)
                if p > 0:
                    x = F.dropout(x, p, training=True)
                return output + (delta(x) * 0.5).to(output.dtype)

            self.params += [down, up]
            self.handles.append(module.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.params.clear()
