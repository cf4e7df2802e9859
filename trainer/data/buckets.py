"""Aspect-ratio bucketing, compatible with kohya sd-scripts' BucketManager.

Sizes follow two conventions, as the ecosystem does: buckets and resized sizes are (width, height) like kohya's
bucket lists, while `original_size` and crop offsets are (height, width) / (top, left) like SDXL's
micro-conditioning. Every name says which.

* Upscale mode (default): a predefined bucket set per base resolution (:func:`make_buckets`); an image goes to the
  bucket of nearest aspect ratio, is resized to cover it and the overflow is cut (centre or seeded random).
* No-upscale mode: no predefined set; the bucket comes from the image itself (area capped at resolution², sides
  floored to the step), so an image is only ever shrunk or cropped.

Unlike kohya, the recorded crop offsets are the ones actually cut (as OneTrainer and diffusers record them).
"""
from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from PIL import Image

from ..config import BucketConfig
from ..errors import ConfigError

Size = tuple[int, int]
LATENT_FACTOR = 8  # VAE downsampling: bucket sides must be multiples of it


class ImageTooSmall(ValueError):
    """No-upscale mode cannot make a bucket for an image with a side shorter than the bucket step."""


@dataclass(frozen=True)
class CropPlan:
    resolution: int  # the base resolution this sample belongs to
    bucket: Size  # (w, h) of the training image
    resized_size: Size  # (w, h) the image is resized to before the cut
    crop_left: int  # offsets of the cut, in resized pixels
    crop_top: int
    original_size: Size  # (h, w) of the source image after EXIF orientation
    ar_error: float  # bucket aspect ratio - image aspect ratio (kohya's sign)

    @property
    def crop_top_left(self) -> tuple[int, int]:
        return (self.crop_top, self.crop_left)

    @property
    def flipped_crop_top_left(self) -> tuple[int, int]:
        """Offsets of the same cut in the horizontally mirrored resized image."""
        return (self.crop_top, self.resized_size[0] - self.bucket[0] - self.crop_left)


def check_step(step: int) -> None:
    if step < LATENT_FACTOR or step % LATENT_FACTOR:
        raise ConfigError(f"bucket step must be a positive multiple of {LATENT_FACTOR} (64 is usual), got {step}")


def snap_limits(resolution: int, min_size: int, max_size: int, step: int) -> tuple[int, int]:
    """kohya's snapping: min floored and max ceiled to the step, then both checked against the resolution."""
    check_step(step)
    lo = min_size - min_size % step
    hi = max_size + (-max_size) % step
    if lo <= 0:
        raise ConfigError(f"min_bucket ({min_size}) must be at least the bucket step ({step})")
    if lo > resolution:
        raise ConfigError(f"min_bucket ({min_size}) must not exceed the resolution ({resolution}); lower min_bucket")
    if hi < resolution:
        raise ConfigError(
            f"max_bucket ({max_size}) must be at least the resolution ({resolution}); "
            f"set max_bucket to {2 * resolution} (2x the resolution is usual)"
        )
    return lo, hi


def make_buckets(resolution: int, min_size: int = 256, max_size: int = 1024, step: int = 64) -> list[Size]:
    """All (w, h) buckets for a square base resolution, sorted: kohya's make_bucket_resolutions set.

    Every bucket has area <= resolution², sides within [min, max] and multiples of `step`; widths are enumerated
    and each gets the tallest height that fits (capped at max), plus its transpose, plus the square.
    """
    lo, hi = snap_limits(resolution, min_size, max_size, step)
    area = resolution * resolution
    side = int(math.sqrt(area)) // step * step
    buckets = {(side, side)}
    for width in range(lo, hi + 1, step):
        height = min(hi, area // width // step * step)
        if height >= lo:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def select_bucket(size: Size, buckets: Sequence[Size]) -> tuple[Size, float]:
    """The bucket for an image of (w, h): its own size if that is a bucket, else the nearest aspect ratio."""
    w, h = size
    ratio = w / h
    if tuple(size) in buckets:
        return (w, h), 0.0
    best = min(buckets, key=lambda b: abs(b[0] / b[1] - ratio))  # min() keeps the first of equal errors
    return best, best[0] / best[1] - ratio


def cover_size(size: Size, bucket: Size) -> Size:
    """Smallest aspect-preserving resize of (w, h) that covers the bucket (one side matches exactly)."""
    w, h = size
    bw, bh = bucket
    scale = bh / h if w / h > bw / bh else bw / w  # the relatively wider image matches height
    return max(bw, int(w * scale + 0.5)), max(bh, int(h * scale + 0.5))


def no_upscale_size(size: Size, resolution: int, step: int) -> tuple[Size, Size]:
    """(resized, bucket) in no-upscale mode: shrink only when the area exceeds resolution², then floor to the step.

    When shrinking, both ways of rounding to the step (round the width and derive the height, or the reverse) are
    tried and the one with the smaller aspect error kept, as kohya does.
    """
    w, h = size
    if min(w, h) < step:
        raise ImageTooSmall(f"{w}x{h} px has a side shorter than the bucket step ({step} px) and upscaling is off")
    area = resolution * resolution
    ratio = w / h
    if w * h > area:
        exact_w = math.sqrt(area * ratio)

        def to_step(x: float) -> int:
            x = int(x + 0.5)
            return max(step, x - x % step)

        by_width = to_step(exact_w)
        by_height = to_step(area / exact_w)
        err_w = abs(by_width / to_step(by_width / ratio) - ratio)
        err_h = abs(to_step(by_height * ratio) / by_height - ratio)
        if err_w < err_h:
            resized = (by_width, int(by_width / ratio + 0.5))
        else:
            resized = (int(by_height * ratio + 0.5), by_height)
    else:
        resized = (w, h)
    bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    if min(bucket) < step:
        raise ImageTooSmall(f"{w}x{h} px is too elongated: at most {resolution}² px its short side is under {step} px")
    return resized, bucket


def plan_crop(
    size: Size,
    resolution: int,
    buckets: Optional[Sequence[Size]],
    *,
    step: int = 64,
    crop: str = "center",
    rng: Optional[random.Random] = None,
) -> CropPlan:
    """The full plan for one image at one base resolution. `buckets=None` means no-upscale mode."""
    w, h = size
    if buckets is None:
        resized, bucket = no_upscale_size(size, resolution, step)
        ar_error = bucket[0] / bucket[1] - w / h
    else:
        bucket, ar_error = select_bucket(size, buckets)
        resized = cover_size(size, bucket)
    spare_w, spare_h = resized[0] - bucket[0], resized[1] - bucket[1]
    if crop == "random":
        rng = rng or random.Random(0)
        left, top = rng.randint(0, spare_w), rng.randint(0, spare_h)
    elif crop == "center":
        left, top = spare_w // 2, spare_h // 2
    else:
        raise ConfigError(f"crop must be 'center' or 'random', got {crop!r}")
    return CropPlan(resolution, bucket, resized, left, top, (h, w), ar_error)


class Bucketer:
    """Plans every image for every base resolution of a BucketConfig (one CropPlan each)."""

    def __init__(self, cfg: BucketConfig, seed: int = 0):
        if not cfg.resolutions:
            raise ConfigError("resolutions must list at least one base resolution, e.g. [512]")
        if cfg.crop not in ("center", "random"):
            raise ConfigError(f"crop must be 'center' or 'random', got {cfg.crop!r}")
        self.cfg = cfg
        self.seed = seed
        self.resolutions = sorted({int(r) for r in cfg.resolutions})
        if cfg.no_upscale:  # kohya ignores min/max buckets here; only the step is checked
            check_step(cfg.step)
            self.buckets: dict[int, Optional[list[Size]]] = {r: None for r in self.resolutions}
        else:
            self.buckets = {r: make_buckets(r, cfg.min_bucket, cfg.max_bucket, cfg.step) for r in self.resolutions}

    def plans(self, size: Size, key: str = "") -> list[CropPlan]:
        """One plan per resolution. Random crops are seeded by (seed, key, resolution): `key` is the image's
        content hash, so an image keeps its crop however the dataset around it changes (and its cache entry)."""
        out = []
        for res in self.resolutions:
            digest = hashlib.sha256(f"{self.seed}:{key}:{res}".encode()).digest()
            rng = random.Random(int.from_bytes(digest[:8], "big"))
            out.append(plan_crop(size, res, self.buckets[res], step=self.cfg.step, crop=self.cfg.crop, rng=rng))
        return out


def apply_crop_plan(img: Image.Image, plan: CropPlan) -> Image.Image:
    """Resize (Lanczos) and cut exactly as planned; the result is always the bucket size.

    `img` may be smaller than the original (a JPEG decoded at reduced scale): it is resized to the planned size.
    """
    if img.size != plan.resized_size:
        shrinking = img.width > plan.resized_size[0]
        # reducing_gap: an integer box reduction first, then Lanczos; much faster for large shrinks, same look.
        img = img.resize(plan.resized_size, Image.Resampling.LANCZOS, reducing_gap=3.0 if shrinking else None)
    bw, bh = plan.bucket
    out = img.crop((plan.crop_left, plan.crop_top, plan.crop_left + bw, plan.crop_top + bh))
    assert out.size == plan.bucket, (out.size, plan)
    return out


@dataclass
class BucketReport:
    rows: list[tuple[int, Size, int, int]]  # (resolution, bucket (w, h), images, samples incl. repeats)
    mean_ar_error: float
    max_ar_error: float

    def to_dict(self) -> dict:
        return {
            "buckets": [
                {"resolution": r, "width": b[0], "height": b[1], "images": n, "samples": s} for r, b, n, s in self.rows
            ],
            "mean_ar_error": self.mean_ar_error,
            "max_ar_error": self.max_ar_error,
        }

    def to_text(self) -> str:
        error = f"mean |aspect error| {self.mean_ar_error:.3f} (max {self.max_ar_error:.3f})"
        lines = [f"Buckets: {len(self.rows)}, {error}"]
        for res, (w, h), images, samples in self.rows:
            lines.append(f"  [{res}] {w:>4}x{h:<4} {images:>5} image(s), {samples:>6} sample(s)/epoch")
        return "\n".join(lines)


def bucket_report(plans: Iterable[CropPlan], repeats: Optional[Iterable[int]] = None) -> BucketReport:
    plans = list(plans)
    reps = list(repeats) if repeats is not None else [1] * len(plans)
    images: Counter = Counter()
    samples: Counter = Counter()
    for plan, r in zip(plans, reps):
        images[(plan.resolution, plan.bucket)] += 1
        samples[(plan.resolution, plan.bucket)] += r
    errors = [abs(p.ar_error) for p in plans]
    rows = [(res, b, images[(res, b)], samples[(res, b)]) for res, b in sorted(images)]
    mean = sum(errors) / len(errors) if errors else 0.0
    return BucketReport(rows, mean, max(errors, default=0.0))
