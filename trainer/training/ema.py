"""Exponential moving average of the adapter weights (fp32 shadow copies), for smoother final LoRAs.

Usage in the loop: ``ema.update()`` after each optimizer step; ``with ema.swap(): save / preview`` to use the
averaged weights temporarily; ``ema.state_dict()`` goes into the resume state.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional

import torch


class AdapterEMA:
    """``shadow = d * shadow + (1 - d) * param`` after every optimizer step.

    With ``warmup`` the decay used at the n-th update (n = 0, 1, ...) is ``min(decay, (1 + n) / (10 + n))``:
    0.1, 0.18, 0.25, ... so the average follows the freshly initialised adapter closely at first instead of
    being anchored to its starting values for ~1/(1-decay) steps (the same ramp as diffusers' EMAModel).
    ``device`` keeps the shadows elsewhere (e.g. "cpu" to save VRAM); default: next to each parameter.
    """

    def __init__(self, parameters: Iterable[torch.Tensor], decay: float, warmup: bool = True,
                 device: Optional[torch.device | str] = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay} (0.999 is usual; 0 disables EMA)")
        self.parameters = list(parameters)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow = [p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
                       for p in self.parameters]

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.current_decay()
        current = [p.detach().to(device=s.device, dtype=torch.float32) for p, s in zip(self.parameters, self.shadow)]
        torch._foreach_lerp_(self.shadow, current, weight)  # shadow += weight * (param - shadow), all tensors at once
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, parameters: Optional[Iterable[torch.Tensor]] = None) -> None:
        """Write the averaged weights into ``parameters`` (default: the tracked ones), in their own dtype."""
        targets = self.parameters if parameters is None else list(parameters)
        if len(targets) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} tensors, got {len(targets)}")
        for target, shadow in zip(targets, self.shadow):
            target.copy_(shadow)

    @contextlib.contextmanager
    def swap(self) -> Iterator[None]:
        """Temporarily put the averaged weights into the tracked parameters; the trained ones come back on exit,
        even when the body raises."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.parameters]
            self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, original in zip(self.parameters, saved):
                    p.copy_(original)


    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": [s.detach().clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise ValueError("EMA state does not match the adapter (different tensors or shapes): the resume state "
                             "belongs to another network configuration")
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
        for mine, saved in zip(self.shadow, shadow):
            mine.copy_(saved.to(device=mine.device, dtype=torch.float32))
