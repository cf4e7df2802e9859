"""Checks that a model came out of training exactly as it went in (shared by the ComfyUI training tests)."""
from __future__ import annotations

import torch


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def snapshot(root) -> dict:
    return {k: v.detach().clone() for k, v in root.state_dict().items()}


def assert_unchanged(root, before: dict) -> None:
    """Bit-identical weights and buffers, no hook or instance ``forward`` left behind, no gradient computed for a
    frozen weight."""
    now = root.state_dict()
    changed = [k for k in before if before[k].dtype != now[k].dtype or not torch.equal(_bits(before[k]), _bits(now[k]))]
    assert not changed, changed[:5]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in root.modules())
    assert all("forward" not in m.__dict__ for m in root.modules())
    assert all(p.grad is None for p in root.parameters())
