"""Content-addressed caches of VAE latents and text-encoder outputs, on disk as safetensors.

A key covers everything that changes the value (DESIGN invariant 6): for a latent the image's hash (of the file's
bytes, or of the pixels of an image that came from the graph), bucket, crop plan, flip, encoder identity, dtype and
the resize method; for text the caption, encoder identity and clip skip. Nothing is ever invalidated by name or
date, so editing one caption re-encodes one caption.

Layout: one file per entry, ``<folder>/<key[:2]>/<key>.safetensors`` (text and latent keys never collide, so
the two caches may share a folder, though separate ones are tidier). Per-entry files (rather than
per-bucket shards) make every entry durable the moment it is encoded, so an interrupted pass resumes where it
stopped; a write never rewrites other entries; a damaged file costs one entry. The two-character sub-folders keep
directories small on big datasets. A hit is one small file open, so checking 100 images takes milliseconds.
Every read is validated (header, stored key, tensor names, shape, dtype, finite values); a bad entry is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import BucketConfig, DatasetConfig
from ..errors import TrainingError
from ..files.atomic import write_with
from .buckets import LATENT_FACTOR, Bucketer, BucketReport, CropPlan, ImageTooSmall, apply_crop_plan, bucket_report
from .dataset import Dataset, DatasetError, ImageItem
from .images import ImageReadError, load_image

CACHE_FORMAT = 1  # bump when the meaning of stored values changes
RESIZE_METHOD = "pil-lanczos-rg3"  # part of the latent key: another resize gives other pixels
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
Tensors = dict[str, torch.Tensor]


def _digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def latent_key(content_hash: str, plan: CropPlan, flip: bool, encoder_id: str, dtype: str) -> str:
    return _digest({
        "format": CACHE_FORMAT, "image": content_hash, "bucket": list(plan.bucket),
        "resized": list(plan.resized_size), "crop": [plan.crop_left, plan.crop_top], "flip": bool(flip),
        "encoder": encoder_id, "dtype": dtype, "resize": RESIZE_METHOD,
    })


def text_key(text: str, encoder_id: str, clip_skip: int) -> str:
    return _digest({"format": CACHE_FORMAT, "text": text, "encoder": encoder_id, "clip_skip": int(clip_skip)})


def dtype_name(dtype: Union[str, torch.dtype]) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise TrainingError(f"cache dtype must be one of float32, float16, bfloat16; got {dtype!r}")
    return str(DTYPES[dtype]).removeprefix("torch.")


class EntryStore:
    """safetensors files addressed by key. `read` returns (tensors, state), state in hit | missing | corrupt."""

    def __init__(self, folder: Union[str, Path]):
        self.root = Path(folder)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def read(self, key: str, valid: Callable[[Tensors], bool]) -> tuple[Optional[Tensors], str]:
        try:
            with safe_open(str(self.path(key)), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:  # a renamed or foreign file
                    return None, "corrupt"
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except FileNotFoundError:
            return None, "missing"
        except Exception:  # bad header, truncated data: safetensors raises its own error types
            return None, "corrupt"
        return (tensors, "hit") if valid(tensors) else (None, "corrupt")

    def write(self, key: str, tensors: Tensors, **metadata: str) -> None:
        payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        write_with(self.path(key), lambda tmp: save_file(payload, str(tmp), metadata={"key": key, **metadata}))


@dataclass
class CacheStats:
    hits: int = 0
    encoded: int = 0
    rebuilt: int = 0  # entries found damaged and encoded again (also counted in `encoded`)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image path, reason): skipped
    seconds: float = 0.0

    def to_text(self) -> str:
        lines = [f"Cache: {self.hits} hit(s), {self.encoded} encoded ({self.rebuilt} rebuilt), "
                 f"{len(self.failed)} failed, {self.seconds:.2f} s"]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.failed]
        return "\n".join(lines)


class TextCache:
    """Text-encoder outputs by (caption, encoder, clip skip), with a small in-memory LRU for batch-time use."""

    def __init__(self, folder: Union[str, Path], memory_items: int = 1024):
        self.store = EntryStore(folder)
        self.stats = CacheStats()
        self._memory: OrderedDict[str, Tensors] = OrderedDict()
        self._memory_items = memory_items

    def get_or_encode(
        self, captions: Sequence[str], encode_fn: Callable[..., list[Tensors]], encoder_id: str,
        clip_skip: int = 1, batch_size: Optional[int] = None,
    ) -> list[Tensors]:
        """One dict per caption ({"context", optionally "pooled"}). Only the distinct misses are encoded, in one
        call of ``encode_fn(texts)`` (or chunks of `batch_size`). `encode_fn` must already use `clip_skip`, e.g.
        ``lambda texts: host.encode_text(texts, clip_skip)``; here it only enters the key."""
        keys = [text_key(c, encoder_id, clip_skip) for c in captions]
        found: dict[str, Tensors] = {}
        misses: dict[str, str] = {}  # key -> caption, distinct, in first-seen order
        for key, caption in zip(keys, captions):
            if key in found or key in misses:
                continue
            if key in self._memory:
                self._memory.move_to_end(key)
                found[key] = self._memory[key]
                self.stats.hits += 1
                continue
            tensors, state = self.store.read(key, _valid_text)
            if tensors is not None:
                found[key] = tensors
                self.stats.hits += 1
            else:
                self.stats.rebuilt += state == "corrupt"
                misses[key] = caption
        miss_keys, texts = list(misses), list(misses.values())
        step = batch_size or max(1, len(texts))
        for start in range(0, len(texts), step):
            chunk = texts[start:start + step]
            with torch.no_grad():
                outputs = encode_fn(chunk)
            if len(outputs) != len(chunk):
                raise TrainingError(f"text encoder returned {len(outputs)} results for {len(chunk)} captions")
            for key, out in zip(miss_keys[start:start + step], outputs):
                tensors = {k: v.detach().to("cpu").contiguous() for k, v in out.items() if v is not None}
                if not _valid_text(tensors):
                    raise TrainingError("text encoder returned no finite 'context' tensor (NaN/Inf in its output)")
                self.store.write(key, tensors, kind="text")
                found[key] = tensors
                self.stats.encoded += 1
        for key in keys:
            self._memory[key] = found[key]
            self._memory.move_to_end(key)
        while len(self._memory) > self._memory_items:
            self._memory.popitem(last=False)
        return [found[k] for k in keys]


def _valid_text(tensors: Tensors) -> bool:
    context = tensors.get("context")
    return context is not None and context.ndim >= 2 and all(bool(torch.isfinite(t).all()) for t in tensors.values())


@dataclass
class LatentSample:
    latent: torch.Tensor  # (C, h, w) unscaled VAE mean, cache dtype
    latent_flipped: Optional[torch.Tensor]  # horizontally flipped image's latent; None unless flip is on
    caption: str  # raw caption after trigger insertion; vary it per step with captions.build_caption
    repeats: int
    bucket: tuple[int, int]  # (w, h) in pixels
    resolution: int  # base resolution (batches never mix two)
    original_size: tuple[int, int]  # (h, w) of the source image
    crop_top_left: tuple[int, int]  # (top, left) actually cut, in resized pixels
    crop_top_left_flipped: Optional[tuple[int, int]]  # the same for the flipped variant (left mirrored)
    image_path: str
    content_hash: str = ""
    loss_weight: float = 1.0  # multiplies this sample's loss (regularisation images: prior_loss_weight)
    caption_options: Optional[DatasetConfig] = None  # its own dataset's caption options (combined datasets)

    def size_ids(self, flipped: bool = False) -> tuple[int, int, int, int, int, int]:
        """SDXL micro-conditioning: original_h, original_w, crop_top, crop_left, target_h, target_w."""
        top, left = self.crop_top_left_flipped if flipped and self.crop_top_left_flipped else self.crop_top_left
        return (*self.original_size, top, left, self.bucket[1], self.bucket[0])


@dataclass
class LatentReport:
    buckets: BucketReport
    stats: CacheStats

    def to_text(self) -> str:
        return self.buckets.to_text() + "\n" + self.stats.to_text()

    def to_dict(self) -> dict:
        s = self.stats
        return {"buckets": self.buckets.to_dict(), "hits": s.hits, "encoded": s.encoded, "rebuilt": s.rebuilt,
                "failed": [list(f) for f in s.failed], "seconds": s.seconds}


@dataclass
class LatentSet:
    samples: list[LatentSample]
    report: LatentReport

    @property
    def stats(self) -> CacheStats:
        return self.report.stats


@dataclass
class _Job:  # one image at one resolution, with the variants (flip False/True) still to encode
    item: ImageItem
    plan: CropPlan
    variants: list[tuple[bool, str]]


def prepare_latents(
    dataset: Union[Dataset, Iterable[ImageItem]],
    bucket_cfg: BucketConfig,
    encode_images: Callable[[torch.Tensor], torch.Tensor],
    encoder_id: str,
    cache_dir: Union[str, Path],
    dtype: Union[str, torch.dtype] = "float32",
    batch_size: int = 4,
    seed: int = 0,
    progress: Optional[Callable[[int, int], None]] = None,
    check_interrupt: Optional[Callable[[], None]] = None,
) -> LatentSet:
    """Bucket every image, load cached latents and encode only the misses (same-bucket batches of `batch_size`).

    Hits decode nothing. Each new entry is written as soon as its batch is encoded, so an interrupted pass (an
    exception from `check_interrupt`, called between batches) loses at most one batch. Images that fail to
    decode are skipped and listed in ``report.stats.failed``; :class:`DatasetError` only when none is left.
    """
    started = time.perf_counter()
    items = list(getattr(dataset, "items", dataset))  # a Dataset, or any list of ImageItem
    dtype_key, store, stats = dtype_name(dtype), EntryStore(cache_dir), CacheStats()
    torch_dtype = DTYPES[dtype_key]
    flips = (False, True) if bucket_cfg.flip else (False,)
    bucketer = Bucketer(bucket_cfg, seed)

    planned: list[tuple[ImageItem, CropPlan, tuple[str, ...]]] = []
    for item in items:
        try:
            plans = bucketer.plans((item.width, item.height), item.content_hash)
        except ImageTooSmall as e:
            stats.failed.append((item.path, str(e)))
            continue
        for plan in plans:
            keys = tuple(latent_key(item.content_hash, plan, f, encoder_id, dtype_key) for f in flips)
            planned.append((item, plan, keys))

    latents: dict[str, torch.Tensor] = {}
    jobs: dict[tuple[str, CropPlan], _Job] = {}
    queued: set[str] = set()
    for item, plan, keys in planned:
        for flip, key in zip(flips, keys):
            if key in latents or key in queued:
                continue  # duplicate images share entries
            tensors, state = store.read(key, lambda t, b=plan.bucket: _valid_latent(t, b, torch_dtype))
            if tensors is not None:
                latents[key] = tensors["latent"]
                stats.hits += 1
                continue
            stats.rebuilt += state == "corrupt"
            queued.add(key)
            jobs.setdefault((item.path, plan), _Job(item, plan, [])).variants.append((flip, key))

    failed_paths = _encode_jobs(list(jobs.values()), encode_images, store, latents, stats, torch_dtype,
                                batch_size, progress, check_interrupt)
    samples, kept_plans = [], []
    for item, plan, keys in planned:
        if item.path in failed_paths or any(k not in latents for k in keys):
            continue
        kept_plans.append(plan)
        samples.append(LatentSample(
            latent=latents[keys[0]], latent_flipped=latents[keys[1]] if len(keys) > 1 else None,
            caption=item.caption, repeats=item.repeats, bucket=plan.bucket, resolution=plan.resolution,
            original_size=plan.original_size, crop_top_left=plan.crop_top_left,
            crop_top_left_flipped=plan.flipped_crop_top_left if len(keys) > 1 else None,
            image_path=item.path, content_hash=item.content_hash, loss_weight=float(item.loss_weight),
            caption_options=item.caption_options,
        ))
    stats.seconds = time.perf_counter() - started
    report = LatentReport(bucket_report(kept_plans, [s.repeats for s in samples]), stats)
    if not samples:
        reasons = "; ".join(f"{Path(p).name}: {r}" for p, r in stats.failed[:5]) or "the dataset is empty"
        raise DatasetError(f"No image could be prepared for training ({reasons})")
    return LatentSet(samples, report)


def _encode_jobs(jobs, encode_images, store, latents, stats, torch_dtype, batch_size, progress, check_interrupt):
    """Decode, crop and encode the misses bucket by bucket; returns the paths of images that failed."""
    by_bucket: dict[tuple[int, int], list[_Job]] = defaultdict(list)
    for job in jobs:
        by_bucket[job.plan.bucket].append(job)
    total, done, failed = sum(len(j.variants) for j in jobs), 0, {}
    if progress and total:
        progress(0, total)
    for bucket in sorted(by_bucket):
        batch: list[tuple[np.ndarray, str, ImageItem]] = []
        for job in by_bucket[bucket]:
            if job.item.path in failed:
                done += len(job.variants)
                continue
            try:
                arrays = _pixels(job)
            except ImageReadError as e:
                failed[job.item.path] = e.reason
                stats.failed.append((job.item.path, e.reason))
                done += len(job.variants)
                continue
            if batch and len(batch) + len(arrays) > batch_size:
                done += _flush(batch, bucket, encode_images, store, latents, stats, torch_dtype, failed)
                batch = []
                if progress:
                    progress(done, total)
                if check_interrupt:
                    check_interrupt()
            batch += [(a, key, job.item) for a, (_, key) in zip(arrays, job.variants)]
        if batch:
            done += _flush(batch, bucket, encode_images, store, latents, stats, torch_dtype, failed)
            if progress:
                progress(done, total)
            if check_interrupt:
                check_interrupt()
    return set(failed)


def training_image(item: ImageItem, plan: CropPlan) -> "Image.Image":
    """The exact pixels a sample trains on: the file read once, checked against the scanned hash (so a cache
    entry never stores pixels of another version of the file), decoded at reduced scale where possible, cut.
    An image held in memory (``item.pixels``, hashed when it was made) is resized and cut the same way."""
    if item.pixels is not None:
        return apply_crop_plan(Image.fromarray(np.asarray(item.pixels, dtype=np.uint8)), plan)
    data = _read(item.path)
    if hashlib.sha256(data).hexdigest() != item.content_hash:
        raise ImageReadError(item.path, "file changed since the dataset was scanned; load the dataset again")
    return apply_crop_plan(load_image(data, item.path, target_size=plan.resized_size), plan)


def _pixels(job: _Job) -> list[np.ndarray]:
    """HWC uint8 arrays of the bucket size, one per variant still to encode."""
    base = np.asarray(training_image(job.item, job.plan))
    return [np.ascontiguousarray(base[:, ::-1]) if flip else base for flip, _ in job.variants]


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ImageReadError(path, f"cannot read ({e.strerror or e})") from e


def _flush(batch, bucket, encode_images, store, latents, stats, torch_dtype, failed) -> int:
    pixels = torch.from_numpy(np.stack([a for a, _, _ in batch])).to(torch.float32).div_(255.0)
    with torch.no_grad():
        out = encode_images(pixels)
    expected = (len(batch), bucket[1] // LATENT_FACTOR, bucket[0] // LATENT_FACTOR)
    if out.ndim != 4 or (out.shape[0], out.shape[2], out.shape[3]) != expected:
        raise TrainingError(f"image encoder returned shape {tuple(out.shape)} for a {bucket[0]}x{bucket[1]} batch "
                            f"of {len(batch)}; expected (B, C, H/8, W/8)")
    for row, (_, key, item) in zip(out, batch):
        latent = row.detach().to("cpu", torch_dtype).contiguous().clone()
        if not torch.isfinite(latent).all():
            if item.path not in failed:
                failed[item.path] = "the VAE produced NaN/Inf (an fp16 VAE overflowing? use an fp32/bf16 VAE)"
                stats.failed.append((item.path, failed[item.path]))
            continue
        store.write(key, {"latent": latent}, kind="latent", image=Path(item.path).name,
                    bucket=f"{bucket[0]}x{bucket[1]}")
        latents[key] = latent
        stats.encoded += 1
    return len(batch)


def _valid_latent(tensors: Tensors, bucket: tuple[int, int], dtype: torch.dtype) -> bool:
    latent = tensors.get("latent")
    return (
        latent is not None and latent.ndim == 3 and latent.dtype == dtype
        and tuple(latent.shape[1:]) == (bucket[1] // LATENT_FACTOR, bucket[0] // LATENT_FACTOR)
        and bool(torch.isfinite(latent).all())
    )
