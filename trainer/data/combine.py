"""Several datasets in one run (kohya's "subsets"), optionally with regularisation images (prior preservation).

Each part keeps what its own dataset node set: repeats, trigger word (already in its captions) and caption options
(shuffle, keep tokens, separator, dropout), carried by every item as ``caption_options`` and applied per sample
when the batch is built (``training/loop.py`` ``collate``). A part's ``loss_weight`` multiplies the loss of its
samples: regularisation (class) images train with kohya's ``prior_loss_weight`` (1.0 in kohya), the others with 1.

The combined :class:`~trainer.data.dataset.Dataset` is an ordinary one: caching, batching and the run's identity
see its items. Its ``config`` only answers the run-wide questions (is the text encoder needed every step: any part
shuffles or drops captions; its trigger word: the parts' own, for the file's metadata); every item carries its own.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Sequence

from ..config import DatasetConfig
from ..errors import TrainingError
from .dataset import Dataset

TRAIN, REGULARIZATION = "train", "regularization"
ROLES = (TRAIN, REGULARIZATION)


@dataclass
class Part:
    dataset: Dataset
    loss_weight: float = 1.0
    role: str = TRAIN


@dataclass
class CombinedReport:
    """One section per part, each with its own dataset report, and the totals."""

    parts: list[tuple[str, str, float, object]] = field(default_factory=list)  # (label, role, weight, report)

    @property
    def images(self) -> int:
        return sum(report.images for _, _, _, report in self.parts)

    @property
    def samples_per_epoch(self) -> int:
        return sum(report.samples_per_epoch for _, _, _, report in self.parts)

    def samples_of(self, role: str) -> int:
        return sum(report.samples_per_epoch for _, r, _, report in self.parts if r == role)

    def to_dict(self) -> dict:
        return {"parts": [{"label": label, "role": role, "loss_weight": weight, "report": report.to_dict()}
                          for label, role, weight, report in self.parts],
                "images": self.images, "samples_per_epoch": self.samples_per_epoch}

    def to_text(self) -> str:
        train, reg = self.samples_of(TRAIN), self.samples_of(REGULARIZATION)
        lines = [f"Combined dataset: {len(self.parts)} part(s), {self.images} image(s), {self.samples_per_epoch} "
                 f"sample(s) per epoch (repeats included)"]
        if reg:
            lines.append(f"  training {train} / regularisation {reg} sample(s) per epoch")
            if not 0.5 <= reg / max(1, train) <= 2.0:
                lines.append("  note: kohya balances regularisation samples to the training samples per epoch; "
                             "set the regularisation dataset's repeats to bring the two closer")
        for label, role, weight, report in self.parts:
            lines.append("")
            lines.append(f"[{label}] {role}, loss weight {weight:g}")
            lines.extend("  " + line for line in report.to_text().splitlines())
        return "\n".join(lines)


def combine(parts: Sequence[Part]) -> Dataset:
    """One dataset from ``parts``. A part may itself be combined: its items keep their own caption options, and their
    loss weights are multiplied by the part's."""
    if not parts:
        raise TrainingError("Combine Datasets: no dataset connected; connect at least one dataset")
    report, items, digest = CombinedReport(), [], hashlib.sha256(b"combined:v1")
    for number, part in enumerate(parts, start=1):
        if part.role not in ROLES:
            raise TrainingError(f"Combine Datasets: part role must be one of {', '.join(ROLES)}, got {part.role!r}")
        if not part.loss_weight >= 0:
            raise TrainingError(f"Combine Datasets: a loss weight must be 0 or more, got {part.loss_weight}")
        dataset = part.dataset
        label = f"{number}: {dataset.folder}"
        for item in dataset.items:
            items.append(dataclasses.replace(
                item, loss_weight=float(item.loss_weight) * float(part.loss_weight),
                caption_options=item.caption_options or dataset.config))
        report.parts.append((label, part.role, float(part.loss_weight), dataset.report))
        digest.update(f"{dataset.fingerprint}|{part.loss_weight!r}|{part.role}\n".encode())
    configs = [item.caption_options for item in items]
    triggers = list(dict.fromkeys(p.dataset.config.trigger_word.strip() for p in parts
                                  if p.role == TRAIN and p.dataset.config.trigger_word.strip()))
    merged = DatasetConfig(
        folder="", trigger_word=", ".join(triggers),
        shuffle_captions=any(c.shuffle_captions for c in configs),
        caption_dropout=max(c.caption_dropout for c in configs))
    folder = " + ".join(p.dataset.folder for p in parts)
    return Dataset(folder, items, report, merged, digest.hexdigest()[:16])
