"""The adapter module contract every algorithm follows, and plain LoRA (kohya's ``networks.lora``, LoCon on convs).

An adapter is built from its :class:`~trainer.adapters.algorithms.Layout` (the tensors it stores) and reaches its
target only through the network's forward hooks: ``hook_post(x, output)`` returns the target's output with the
adapter's effect added; an algorithm that needs to change the target's *input* (DoRA) also defines ``hook_pre``.
Adapters compute in their own dtype (fp32) whatever dtype the host runs in, and cast their contribution back.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError
from .algorithms import Geometry, Layout


def geometry_of(target: nn.Module) -> Geometry:
    """The shape of a target layer; grouped convolutions and other module types cannot carry an adapter."""
    if isinstance(target, nn.Conv2d):
        if target.groups != 1:
            raise ConfigError(f"grouped convolutions (groups={target.groups}) cannot carry a LoRA")
        return Geometry(target.out_channels, target.in_channels, tuple(target.kernel_size))
    if isinstance(target, nn.Linear):
        return Geometry(target.out_features, target.in_features)
    raise TypeError(f"LoRA targets must be nn.Linear or nn.Conv2d, got {type(target).__name__}")


class AdapterModule(nn.Module):
    """What the network needs from an adapter of any algorithm.

    ``named_tensors()``: kohya suffix -> tensor (the file's tensors, ``alpha`` excluded) in a fixed order;
    ``plus_parameters()``: the factors LoRA+ gives the higher learning rate; ``delta_weight()``: the change the
    adapter makes to its target's weight, at the current multiplier (fp32, the target's weight shape).
    """

    algorithm = ""
    uses_pre_hook = False  # True: the network also registers a forward pre-hook calling hook_pre

    def __init__(self, target: nn.Module, layout: Layout, alpha: Optional[float], dropout: float = 0.0,
                 multiplier: float = 1.0):
        super().__init__()
        self.layout = layout
        self.geometry = geometry_of(target)
        self.rank = layout.rank
        # kohya: alpha 0 or None means alpha = rank (scale 1)
        self.register_buffer("alpha", torch.tensor(float(alpha) if alpha else float(max(layout.rank, 1))))
        self.scale = layout.scale(float(self.alpha))  # cached: reading the buffer each forward would sync the GPU
        self.multiplier = multiplier
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_scale())

    def refresh_scale(self) -> None:
        self.scale = self.layout.scale(float(self.alpha))

    def named_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def plus_parameters(self) -> list[nn.Parameter]:
        tensors = self.named_tensors()
        return [tensors[name] for name in self.layout.plus]

    def hook_post(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return output + self(x).to(output.dtype)

    def hook_pre(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def release(self) -> None:
        """Drop anything kept between the hooks of one call (the network calls this when it detaches)."""

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x.to(self.alpha.dtype))  # alpha is in the adapter's dtype, like its parameters


class LoRAModule(AdapterModule):
    """``lora_down`` (in -> r; for a conv, the target's kernel/stride/padding/dilation) and ``lora_up`` (r -> out; a
    1x1 conv for convs), initialised like kohya (down kaiming-uniform a=sqrt(5), up 0)."""

    algorithm = "lora"

    def __init__(self, target: nn.Module, layout: Layout, alpha: Optional[float], dropout: float = 0.0,
                 multiplier: float = 1.0, generator: Optional[torch.Generator] = None):
        super().__init__(target, layout, alpha, dropout, multiplier)
        rank = layout.rank
        if isinstance(target, nn.Conv2d):
            self.lora_down = nn.Conv2d(target.in_channels, rank, target.kernel_size, target.stride, target.padding,
                                       target.dilation, bias=False, padding_mode=target.padding_mode)
            self.lora_up = nn.Conv2d(rank, target.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(target.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, target.out_features, bias=False)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_up.weight)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self.lora_down.weight, "lora_up.weight": self.lora_up.weight}

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x.to(self.lora_down.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The delta this adapter adds to its target's output for input ``x`` (in the adapter's dtype)."""
        return self.lora_up(self.lora_down(self._input(x))) * (self.scale * self.multiplier)

    def lora_delta(self) -> torch.Tensor:
        """scale * up @ down in fp32, shaped like the target's weight (conv-aware), at multiplier 1."""
        down = self.lora_down.weight.float()
        up = self.lora_up.weight.float().flatten(1)  # (out, r)
        delta = up @ down if down.ndim == 2 else torch.einsum("or,rikl->oikl", up, down)
        return delta * self.scale

    def delta_weight(self) -> torch.Tensor:
        """up @ down * scale * multiplier in fp32, shaped like the target's weight (conv-aware)."""
        return self.lora_delta() * self.multiplier
