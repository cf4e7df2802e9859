"""Text conditioning for the loop: embeddings looked up by the exact caption string.

Two kinds of caption reach the text encoder, and they are kept differently:

* **As written** -- the dataset's captions (trigger word inserted) and the empty caption of caption dropout. The
  loop hands exactly this set to :meth:`TextEmbeddings.prefetch` before training. They are encoded once, cached on
  disk by (caption, encoder identity, clip skip) -- so editing one caption re-encodes one caption -- and held in RAM
  for the whole run (one entry per caption; the dataset bounds them).
* **Per-step variants** -- whatever else :func:`~trainer.data.captions.build_caption` draws, i.e. shuffled tag
  orders. Their number grows with the run (a caption of n shuffled tags has n! orders), so they are encoded on the
  fly, never written to the disk cache, and held only in a small in-memory LRU of :data:`VARIANT_LRU_ITEMS`
  entries. 64 entries are at most ~40 MiB for SDXL (77 x 2048 float32 context + pooled, ~0.6 MiB each) and ~15 MiB
  for SD1.5; that covers the re-draws that do recur (short tag lists with few orders, a batch repeating a caption)
  while keeping memory flat however long the run is. A variant equal to an as-written caption uses that entry.

With text-encoder training on, nothing is cached: the encoders run every step.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import torch

VARIANT_LRU_ITEMS = 64  # per-step caption variants held in RAM; see the module docstring for the sizing

Embedding = dict[str, torch.Tensor]


class TextEmbeddings:
    def __init__(self, host, clip_skip: int, cache_dir: Optional[str | Path], trainable: bool,
                 variant_items: int = VARIANT_LRU_ITEMS):
        self.host = host
        self.clip_skip = clip_skip
        self.trainable = trainable
        self.memory: dict[str, Embedding] = {}  # as written: kept for the run (and on disk)
        self.variants: OrderedDict[str, Embedding] = OrderedDict()  # per-step variants: LRU, never on disk
        self.variant_items = max(0, int(variant_items))
        self.cache = None
        if cache_dir is not None and not trainable:
            from .cache import TextCache

            self.cache = TextCache(Path(cache_dir))
        self.encoded = 0  # how many captions actually went through the text encoder (tests count this)

    def _encode(self, captions: list[str]) -> list[Embedding]:
        self.encoded += len(captions)
        return self.host.encode_text(captions, self.clip_skip)

    def prefetch(self, captions: Sequence[str]) -> None:
        """Encode the captions *as written* (disk-cached, kept in RAM for the run). Only call this with the
        dataset's own captions and the dropout caption; per-step variants go through ``__call__`` alone."""
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
        for caption in missing:
            self.variants.pop(caption, None)  # now held as written

    def _variant_lookup(self, captions: Sequence[str]) -> dict[str, Embedding]:
        """Embeddings of captions that are not as written: LRU hits, the rest encoded now in one call."""
        found: dict[str, Embedding] = {}
        for caption in captions:
            if caption in self.variants and caption not in found:
                self.variants.move_to_end(caption)
                found[caption] = self.variants[caption]
        missing = list(dict.fromkeys(c for c in captions if c not in found))
        if missing:
            with torch.no_grad():
                encoded = self._encode(missing)
            for caption, item in zip(missing, encoded):
                found[caption] = {k: v.detach().to("cpu") for k, v in item.items() if v is not None}
        for caption in found:  # the whole batch's entries stay in `found`, so eviction cannot hit them mid-call
            self.variants[caption] = found[caption]
            self.variants.move_to_end(caption)
        while len(self.variants) > self.variant_items:
            self.variants.popitem(last=False)
        return found

    def items(self, captions: Sequence[str]) -> list[Embedding]:
        """Each caption's own entry ({"context": (tokens, width), "pooled"?, "extra.<name>"?: what the family's
        conditioning reads besides, e.g. an attention mask}), in order. Not for text-encoder training."""
        variants = self._variant_lookup([c for c in captions if c not in self.memory])
        return [self.memory[c] if c in self.memory else variants[c] for c in captions]

    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(context (B, tokens, width), pooled (B, P) or None) for these captions, in order."""
        if self.trainable:
            return self.host.text_forward(list(captions), self.clip_skip)
        items = self.items(captions)
        context = stack_contexts([item["context"] for item in items])
        pooled = torch.stack([item["pooled"] for item in items]) if "pooled" in items[0] else None
        return context, pooled


def padded_rows(items: Sequence[Embedding]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(context, pooled) rows for hosts that read each sample's own entry (``Conditioning.samples``): contexts
    zero-padded to the longest, never repeated to a common multiple (unpadded T5 / Gemma contexts of co-prime
    lengths would multiply into thousands of tokens per step)."""
    longest = max(item["context"].shape[0] for item in items)
    context = torch.stack([torch.nn.functional.pad(item["context"], (0, 0, 0, longest - item["context"].shape[0]))
                           for item in items])
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
