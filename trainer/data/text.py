"""Text conditioning for the loop: cached embeddings looked up by the exact caption string.

How caption shuffle / dropout and the text cache fit together: the cache key is the *final* caption text (plus the
encoder identity and clip skip). Captions as written are encoded once before training; a shuffled variant or the
empty caption of dropout is encoded the first time it is drawn and cached like any other, so each distinct string
is encoded once per model, ever. With text-encoder training on, nothing is cached: the encoders run every step.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch


class TextEmbeddings:
    def __init__(self, host, clip_skip: int, cache_dir: Optional[str | Path], trainable: bool):
        self.host = host
        self.clip_skip = clip_skip
        self.trainable = trainable
        self.memory: dict[str, dict[str, torch.Tensor]] = {}
        self.cache = None
        if cache_dir is not None and not trainable:
            from .cache import TextCache

            self.cache = TextCache(Path(cache_dir))
        self.encoded = 0  # how many captions actually went through the text encoder (tests count this)

    def _encode(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        self.encoded += len(captions)
        return self.host.encode_text(captions, self.clip_skip)

    def prefetch(self, captions: Sequence[str]) -> None:
        if self.trainable:
            return
        missing = sorted({c for c in captions if c not in self.memory})
        if not missing:
            return
        if self.cache is not None:
            found = self.cache.get_or_encode(missing, self._encode, self.host.text_encoder_id, self.clip_skip)
        else:
            found = self._encode(missing)
        self.memory.update(zip(missing, found))

    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(context (B, tokens, width), pooled (B, P) or None) for these captions, in order."""
        if self.trainable:
            return self.host.text_forward(list(captions), self.clip_skip)
        self.prefetch(captions)
        items = [self.memory[c] for c in captions]
        context = stack_contexts([item["context"] for item in items])
        pooled = torch.stack([item["pooled"] for item in items]) if "pooled" in items[0] else None
        return context, pooled


def stack_contexts(contexts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack (tokens, width) contexts. Long captions encode to several 77-token chunks; like ComfyUI, shorter
    contexts are repeated up to the least common multiple of the lengths so every row has the same length."""
    lengths = {c.shape[0] for c in contexts}
    if len(lengths) > 1:
        target = 1
        for n in lengths:
            target = target * n // math.gcd(target, n)
        contexts = [c.repeat(target // c.shape[0], 1) for c in contexts]
    return torch.stack(list(contexts))
