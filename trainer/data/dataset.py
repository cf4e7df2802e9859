"""Scanning a dataset folder: images, caption sidecars, kohya repeat folders, and a report of every problem.

Layout rules (kohya-compatible):
* Images anywhere under the folder (nested folders are walked); hidden files and folders are skipped.
* A sub-folder named ``N_name`` (N an integer) gives its images N repeats; deeper folders inherit the nearest such
  prefix; other folders (``abc_name``) are plain. Images outside any ``N_`` folder get ``default_repeats``.
* ``photo.png`` takes its caption from ``photo<caption_extension>`` in the same folder. An image without one is
  trained with its ``N_name`` folder's class words (kohya's fallback) or only the trigger word, and is reported.

Bad files never stop the scan: they are skipped and listed. Only a missing folder, or one with nothing usable,
raises (one :class:`DatasetError` that says what was found).
"""
from __future__ import annotations

import hashlib
import os
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

from ..config import DatasetConfig
from ..errors import TrainingError
from .captions import insert_trigger, read_caption_file
from .images import IMAGE_EXTENSIONS, ImageReadError, check_image

REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
JUNK_FILES = {"thumbs.db", "desktop.ini"}
SHORT_SIDE_BINS = (256, 512, 768, 1024, 1536, 2048, 4096)
LIST_LIMIT = 20  # lines per problem in to_text(); to_dict() keeps everything


class DatasetError(TrainingError):
    """The dataset cannot be used at all. Carries the report when there is one."""

    def __init__(self, message: str, report: Optional["DatasetReport"] = None):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class ImageItem:
    path: str  # absolute; for an image held in memory a name that is unique for its pixels (graph_images.py)
    caption: str  # after trigger insertion; "" when there is neither caption, class words nor trigger
    repeats: int
    width: int  # after EXIF orientation
    height: int
    content_hash: str  # sha256 of the file bytes (in memory: of the RGB pixels and their size)
    captioned: bool = True  # False when no usable caption file existed
    rel_path: str = ""  # relative to the dataset folder, "/" separated
    # An image that has no file (Dataset from Images): its (H, W, 3) uint8 RGB pixels. None: read `path`.
    pixels: Optional[object] = field(default=None, compare=False, hash=False, repr=False)
    loss_weight: float = 1.0  # multiplies this image's loss (regularisation images: prior_loss_weight)
    # Caption options of the dataset this item came from when several are combined (combine.py); None: the run's.
    caption_options: Optional[DatasetConfig] = field(default=None, compare=False, hash=False, repr=False)


@dataclass
class DatasetReport:
    folder: str
    images: int = 0  # usable
    captioned: int = 0
    samples_per_epoch: int = 0  # sum of repeats
    missing_captions: list[str] = field(default_factory=list)
    captions_without_image: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    caption_warnings: list[tuple[str, str]] = field(default_factory=list)  # (caption file, problem)
    duplicates: list[list[str]] = field(default_factory=list)  # groups of byte-identical images
    too_small: list[tuple[str, int, int]] = field(default_factory=list)  # (file, w, h)
    min_size: Optional[int] = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # other files / folders not used, with why
    folders: dict[str, tuple[int, int]] = field(default_factory=dict)  # folder -> (repeats, images)
    short_side_histogram: dict[str, int] = field(default_factory=dict)
    kind: str = "folder"  # "folder" (scanned files) or "graph" (images handed over in memory, graph_images.py)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_text(self) -> str:
        files = self.kind == "folder"
        lines = [
            f"Dataset: {self.folder}",
            f"  {self.images} usable image(s), {self.captioned} with a caption{' file' if files else ''}, "
            f"{self.samples_per_epoch} sample(s) per epoch (repeats included)",
        ]
        for folder, (repeats, count) in sorted(self.folders.items()):
            lines.append(f"  {folder or ('(top folder)' if files else 'images')}: {count} image(s) x {repeats} "
                         "repeat(s)")
        if self.short_side_histogram:
            bins = ", ".join(f"{k}: {v}" for k, v in self.short_side_histogram.items())
            lines.append(f"  Short side (px): {bins}")
        sections = [
            ("Unreadable, skipped", [f"{f}: {r}" for f, r in self.unreadable]),
            ("Caption file problems", [f"{f}: {r}" for f, r in self.caption_warnings]),
            ("No caption (trained with folder words / trigger only)" if files else
             "No caption (trained with the trigger word only)", self.missing_captions),
            ("Caption without image", self.captions_without_image),
            ("Duplicates (identical files, all kept)", [" = ".join(g) for g in self.duplicates]),
            (
                f"Smaller than {self.min_size}x{self.min_size} px in area (will be upscaled)",
                [f"{f} ({w}x{h})" for f, w, h in self.too_small],
            ),
            ("Not used", [f"{f}: {r}" for f, r in self.skipped]),
        ]
        problems = [(title, items) for title, items in sections if items]
        lines.append("Problems:" if problems else "No problems found.")
        for title, items in problems:
            lines.append(f"  {title} - {len(items)}:")
            lines.extend(f"    {item}" for item in items[:LIST_LIMIT])
            if len(items) > LIST_LIMIT:
                lines.append(f"    ... and {len(items) - LIST_LIMIT} more")
        return "\n".join(lines)


@dataclass
class Dataset:
    folder: str
    items: list[ImageItem]
    report: DatasetReport
    config: DatasetConfig
    fingerprint: str


def scan_dataset(cfg: DatasetConfig, min_size: Optional[int] = None, workers: Optional[int] = None) -> Dataset:
    """Scan `cfg.folder`. `min_size` (usually the training resolution) flags images with fewer pixels than
    min_size². Each file is read once: its bytes give the content hash and the integrity check."""
    root = _existing_folder(cfg.folder)
    extension = caption_extension(cfg.caption_extension)
    files = _walk(root)
    report = DatasetReport(folder=str(root), min_size=min_size)
    by_folder: dict[str, dict[str, str]] = defaultdict(dict)  # folder -> {lower name: name}
    images, captions = [], []
    for rel in files:
        folder, name = rel.rpartition("/")[::2]
        by_folder[folder][name.lower()] = name
        suffix = Path(name).suffix.lower()
        if suffix in IMAGE_EXTENSIONS:
            images.append(rel)
        elif suffix == extension:
            captions.append(rel)
        else:
            report.skipped.append((rel, f"not a supported image ({', '.join(sorted(IMAGE_EXTENSIONS))}) or caption"))

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        checked = list(pool.map(lambda rel: _inspect(root / rel), images))

    used_captions: set[str] = set()
    items: list[ImageItem] = []
    for rel, result in zip(images, checked):
        folder, name = rel.rpartition("/")[::2]
        wanted = (Path(name).stem + extension).lower()
        caption_rel = None
        if wanted in by_folder[folder]:
            caption_rel = f"{folder}/{by_folder[folder][wanted]}" if folder else by_folder[folder][wanted]
            used_captions.add(caption_rel)
        if isinstance(result, ImageReadError):
            report.unreadable.append((rel, result.reason))
            continue
        repeats, class_words, repeat_folder = _repeats_for(folder, cfg.default_repeats)
        if repeats < 1:
            where = f"folder '{repeat_folder}'" if repeat_folder else "default_repeats"
            report.skipped.append((rel, f"{where} asks for {repeats} repeats"))
            continue
        caption = ""
        if caption_rel is not None:
            caption, warning = read_caption_file(root / caption_rel)
            if warning:
                report.caption_warnings.append((caption_rel, warning))
            if not caption:
                report.caption_warnings.append((caption_rel, "empty (whitespace only): treated as missing"))
        captioned = bool(caption)
        if not captioned:
            report.missing_captions.append(rel)
            caption = class_words
        (width, height), digest = result
        caption = insert_trigger(caption, cfg.trigger_word, cfg.caption_separator)
        items.append(ImageItem(str(root / rel), caption, repeats, width, height, digest, captioned, rel))
        report.folders[repeat_folder] = (repeats, report.folders.get(repeat_folder, (0, 0))[1] + 1)

    report.captions_without_image = [c for c in captions if c not in used_captions]
    summarise(report, items, min_size)
    if not items:
        raise DatasetError(_nothing_usable(root, images, captions, report), report)
    return Dataset(str(root), items, report, cfg, _fingerprint_of(root, images + captions))


def caption_extension(ext: str) -> str:
    ext = (ext or ".txt").strip().lower()
    return ext if ext.startswith(".") else "." + ext


def fingerprint(folder: Union[str, os.PathLike], caption_ext: str = ".txt") -> str:
    """Changes whenever an image or caption file is added, removed, renamed or modified (stat only; cheap).
    ComfyUI calls it on every queue to decide whether Load Dataset must run again."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        return "missing:" + hashlib.sha256(str(root).encode()).hexdigest()[:16]
    extension = caption_extension(caption_ext)
    wanted = [f for f in _walk(root) if Path(f).suffix.lower() in IMAGE_EXTENSIONS | {extension}]
    return _fingerprint_of(root, wanted)


def _fingerprint_of(root: Path, rels: list[str]) -> str:
    h = hashlib.sha256()
    for rel in sorted(rels):
        try:
            st = (root / rel).stat()
        except OSError:
            continue
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _existing_folder(folder: str) -> Path:
    if not folder or not str(folder).strip():
        raise DatasetError("No dataset folder given: set 'folder' to a folder of images (with .txt captions)")
    root = Path(folder).expanduser()
    if not root.exists():
        raise DatasetError(f"Dataset folder not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"Dataset path is a file, not a folder: {root}")
    return root.resolve()


def _walk(root: Path) -> list[str]:
    """Relative "/"-separated paths of every non-hidden file, sorted (deterministic item order)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            if name.startswith(".") or name.lower() in JUNK_FILES:  # ._name = macOS resource fork, not an image
                continue
            out.append(name if rel_dir == "." else f"{rel_dir}/{name}")
    return sorted(out)


def _inspect(path: Path):
    """(oriented size, sha256) or the ImageReadError; runs in worker threads (hashing and zlib release the GIL)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return ImageReadError(path, f"cannot read ({e.strerror or e})")
    try:
        size = check_image(data, path)
    except ImageReadError as e:
        return e
    return size, hashlib.sha256(data).hexdigest()


def _repeats_for(folder: str, default: int) -> tuple[int, str, str]:
    """(repeats, class words, repeat folder) from the nearest enclosing N_name folder."""
    parts = folder.split("/") if folder else []
    for i in range(len(parts) - 1, -1, -1):
        match = REPEAT_FOLDER.match(parts[i])
        if match:
            return int(match.group(1)), " ".join(match.group(2).split()), "/".join(parts[: i + 1])
    return int(default), "", ""


def summarise(report: DatasetReport, items: list[ImageItem], min_size: Optional[int]) -> None:
    """Fill the report's counts, duplicates, small images and short-side histogram from the usable items."""
    report.images = len(items)
    report.captioned = sum(item.captioned for item in items)
    report.samples_per_epoch = sum(item.repeats for item in items)
    groups: dict[str, list[str]] = defaultdict(list)
    for item in items:
        groups[item.content_hash].append(item.rel_path)
    report.duplicates = [g for g in groups.values() if len(g) > 1]
    if min_size:
        report.too_small = [(i.rel_path, i.width, i.height) for i in items if i.width * i.height < min_size * min_size]
    counts: Counter = Counter()
    for item in items:
        counts[_short_side_bin(min(item.width, item.height))] += 1
    report.short_side_histogram = {label: counts[label] for label in _bin_labels() if counts[label]}


def _bin_labels() -> list[str]:
    edges = SHORT_SIDE_BINS
    return [f"<{edges[0]}"] + [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])] + [f">={edges[-1]}"]


def _short_side_bin(side: int) -> str:
    labels = _bin_labels()
    for i, edge in enumerate(SHORT_SIDE_BINS):
        if side < edge:
            return labels[i]
    return labels[-1]


def _nothing_usable(root: Path, images: list[str], captions: list[str], report: DatasetReport) -> str:
    found = [f"{len(images)} image file(s)"]
    if report.unreadable:
        shown = "; ".join(f"{f}: {r}" for f, r in report.unreadable[:3])
        more = f"; and {len(report.unreadable) - 3} more" if len(report.unreadable) > 3 else ""
        found.append(f"{len(report.unreadable)} unreadable ({shown}{more})")
    found.append(f"{len(captions)} caption file(s)")
    if report.skipped:
        found.append(f"{len(report.skipped)} other file(s) not used")
    return (
        f"No usable images in dataset folder {root}: found {', '.join(found)}. "
        f"Supported images: {', '.join(sorted(IMAGE_EXTENSIONS))} (sub-folders are searched)."
    )
