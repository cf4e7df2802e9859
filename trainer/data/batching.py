"""Which samples train together, step by step: bucket-pure batches in a deterministic, resumable order.

A batch holds samples of one bucket at one base resolution only (their latents have one shape, and two base
resolutions are never mixed). Each epoch every sample appears `repeats` times; the order comes only from
(seed, epoch), so a resumed run sees exactly the batches the uninterrupted run would have seen.

Each place in a batch also gets its own seed (:class:`Draw`): everything random about that sample at that step
(flip, caption variation, timestep, noise) is drawn from it. The randomness then depends only on where a sample is
in the run, not on which process trains it or what else is in its micro-batch, so one process with batch 4 and two
processes with batch 2 train the same run, and a resume needs no random-generator state at all.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

from ..errors import TrainingError


class BatchableSample(Protocol):  # LatentSample fits
    repeats: int
    bucket: tuple[int, int]


def group_key(sample: BatchableSample) -> tuple[int, tuple[int, int]]:
    return int(getattr(sample, "resolution", 0)), tuple(sample.bucket)


@dataclass(frozen=True)
class Draw:
    """One sample at one place in the run."""

    index: int  # into the sample list
    seed: int  # keys this sample's flip, caption variation, timestep and noise at this place


def draw_seed(seed: int, epoch: int, position: int, slot: int) -> int:
    """A 63-bit seed for the ``slot``-th sample of batch ``position`` of ``epoch``: distinct for every place."""
    digest = hashlib.sha256(f"draw:{seed}:{epoch}:{position}:{slot}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _rng(seed: int, epoch: int) -> random.Random:
    digest = hashlib.sha256(f"batches:{seed}:{epoch}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def epoch_batches(samples: Sequence[BatchableSample], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Sample indices of every batch of one epoch, in training order.

    Within a group (resolution, bucket) the repeats are laid out in rounds, each round a fresh shuffle of the
    samples that still have repeats left, so one image rarely lands twice in a batch. Each group is cut into
    batches (its last one may be short) and the batches of all groups are shuffled together.
    """
    if batch_size < 1:
        raise TrainingError(f"batch_size must be at least 1, got {batch_size}")
    rng = _rng(seed, epoch)
    groups: dict[tuple[int, tuple[int, int]], list[int]] = defaultdict(list)
    for index, sample in enumerate(samples):
        groups[group_key(sample)].append(index)
    batches: list[list[int]] = []
    for key in sorted(groups):
        members = groups[key]
        order: list[int] = []
        for round_ in range(max(int(samples[i].repeats) for i in members)):
            this_round = [i for i in members if int(samples[i].repeats) > round_]
            rng.shuffle(this_round)
            order += this_round
        batches += [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def batches_per_epoch(samples: Sequence[BatchableSample], batch_size: int) -> int:
    """Independent of the shuffle: per group, ceil(samples with repeats / batch_size)."""
    counts: dict[Any, int] = defaultdict(int)
    for sample in samples:
        counts[group_key(sample)] += int(sample.repeats)
    return sum(-(-n // batch_size) for n in counts.values())


def samples_signature(samples: Sequence[BatchableSample]) -> str:
    """Identifies the sample list as far as batching is concerned (order, repeats, buckets, images)."""
    rows = []
    for s in samples:
        resolution, (width, height) = group_key(s)
        identity = getattr(s, "content_hash", "") or getattr(s, "image_path", "")
        rows.append([identity, int(s.repeats), resolution, width, height])
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


class BatchSampler:
    """An endless, deterministic stream of batches (lists of sample indices), epoch after epoch.

    ``state_dict()`` is two integers plus checks; after ``load_state_dict`` the stream continues exactly where the
    saved one stopped. Loading a state saved for a different sample list or batch size keeps the epoch and the
    position (clamped) and sets ``self.warning``; with ``strict=True`` it raises instead.
    """

    def __init__(self, samples: Sequence[BatchableSample], batch_size: int, seed: int = 0):
        if not samples:
            raise TrainingError("nothing to batch: the dataset produced no training samples")
        if batch_size < 1:
            raise TrainingError(f"batch_size must be at least 1, got {batch_size}")
        self.samples = samples
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0  # index of the next batch within the epoch
        self.warning: Optional[str] = None
        self._signature = samples_signature(samples)
        self._batches: Optional[list[list[int]]] = None

    @property
    def batches_per_epoch(self) -> int:
        return batches_per_epoch(self.samples, self.batch_size)

    def _epoch(self) -> list[list[int]]:
        if self._batches is None:
            self._batches = epoch_batches(self.samples, self.batch_size, self.seed, self.epoch)
        return self._batches

    def next_batch(self) -> list[int]:
        if self.position >= len(self._epoch()):
            self.epoch += 1
            self.position = 0
            self._batches = None
        batch = self._epoch()[self.position]
        self.position += 1
        return list(batch)

    def next_draws(self) -> list[Draw]:
        """The next batch with each place's seed (see the module docstring)."""
        batch = self.next_batch()
        epoch, position = self.epoch, self.position - 1
        return [Draw(index, draw_seed(self.seed, epoch, position, slot)) for slot, index in enumerate(batch)]

    def __iter__(self) -> "BatchSampler":
        return self

    def __next__(self) -> list[int]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "signature": self._signature}

    def load_state_dict(self, state: dict[str, Any], strict: bool = False) -> None:
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError) as e:
            raise TrainingError(f"saved batch-order state is incomplete or damaged ({e!r})") from e
        changes = []
        if int(state.get("seed", self.seed)) != self.seed:
            changes.append(f"seed {state.get('seed')} -> {self.seed}")
        if int(state.get("batch_size", self.batch_size)) != self.batch_size:
            changes.append(f"batch size {state.get('batch_size')} -> {self.batch_size}")
        if state.get("signature", self._signature) != self._signature:
            changes.append("the dataset (images, repeats or buckets)")
        self.warning = None
        if changes:
            message = "resuming with a different " + ", ".join(changes) + ": the batch order differs from the saved run"
            if strict:
                raise TrainingError(message)
            self.warning = message
        self.epoch = max(0, epoch)
        self._batches = None
        self.position = min(max(0, position), len(self._epoch()))
