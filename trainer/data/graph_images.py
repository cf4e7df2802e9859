"""A dataset of images that have no file: pixels handed over by the caller (ComfyUI's IMAGE batches or lists).

Each image becomes an :class:`~trainer.data.dataset.ImageItem` that holds its RGB uint8 pixels and whose
``content_hash`` is the sha256 of those pixels and their size, so the latent cache keys on what the image looks
like: the same pixels hit the cache wherever they come from, and changing one image re-encodes that one only.
The item's ``path`` (it names the image in messages and keeps two different images apart in the caching pass) is
``<graph>/image_NNN#<hash>``: unique for its pixels, never a file.

Captions come as a list with one caption per image, or as one text with one caption per line
(:func:`split_captions`); a count that does not match the images is one clear error.
"""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import numpy as np

from ..config import DatasetConfig
from ..errors import TrainingError
from .captions import insert_trigger, normalise_whitespace
from .dataset import Dataset, DatasetError, DatasetReport, ImageItem, summarise

SOURCE = "images from the graph"
PATH_PREFIX = "<graph>"


def pixel_hash(pixels: np.ndarray) -> str:
    """sha256 of an (H, W, 3) uint8 image: its size and its bytes."""
    h, w = pixels.shape[:2]
    digest = hashlib.sha256(f"rgb8:{w}x{h}:".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def to_rgb8(image) -> np.ndarray:
    """One image, (H, W, C) floats in [0, 1] (ComfyUI's IMAGE layout, a torch tensor or an array) or uint8, to an
    (H, W, 3) uint8 array. Grey is repeated; an alpha channel is composited on white (as file datasets do)."""
    array = image.detach().float().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise TrainingError(f"an image must be (height, width, channels) with 1, 3 or 4 channels; got shape "
                            f"{tuple(array.shape)}")
    if array.dtype != np.uint8:
        array = np.rint(np.clip(np.nan_to_num(array.astype(np.float32)), 0.0, 1.0) * 255.0).astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        alpha = array[:, :, 3:].astype(np.float32) / 255.0
        array = np.rint(array[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(array)


def flatten_images(images: Sequence) -> list[np.ndarray]:
    """ComfyUI IMAGE values (each a (B, H, W, C) batch, or one (H, W, C) image) in order -> one array per image.
    A list of batches of different sizes is fine: every image keeps its own size."""
    out: list[np.ndarray] = []
    for value in images:
        if value is None:
            continue
        ndim = len(value.shape)
        if ndim == 4:
            out.extend(to_rgb8(value[i]) for i in range(value.shape[0]))
        else:
            out.append(to_rgb8(value))
    return out


def split_captions(values: Optional[Sequence[str]]) -> Optional[list[str]]:
    """Captions from a STRING list (one per image) or from one text (one caption per line).

    ``None``, an empty list or only blank text: no captions at all. One string: its lines, blank lines at the start
    and end dropped (a blank line inside is an image without a caption). Several strings: one caption each."""
    texts = [str(v) for v in (values or []) if v is not None]
    if len(texts) > 1:
        return [normalise_whitespace(t) for t in texts]
    text = texts[0] if texts else ""
    if not text.strip():
        return None
    return [normalise_whitespace(line) for line in text.strip("\r\n").splitlines()]


def images_dataset(images: Sequence[np.ndarray], captions: Optional[Sequence[str]], cfg: DatasetConfig,
                   min_size: Optional[int] = None, node: str = "Dataset from Images") -> Dataset:
    """A :class:`Dataset` of in-memory images (from :func:`flatten_images`) with ``cfg``'s trigger, repeats and
    caption options. ``captions``: one per image (after :func:`split_captions`), or None for none."""
    if not images:
        raise DatasetError(f"{node}: no images; connect an IMAGE batch or a list of images")
    if captions is not None and len(captions) != len(images):
        raise DatasetError(
            f"{node}: {len(images)} image(s) but {len(captions)} caption(s); give one caption per image, in the "
            "images' order (a STRING list of the same length, or one text with one caption per line), or none")
    if cfg.default_repeats < 1:
        raise DatasetError(f"{node}: repeats must be at least 1, got {cfg.default_repeats}")
    report = DatasetReport(folder=SOURCE, min_size=min_size, kind="graph")
    items: list[ImageItem] = []
    digest = hashlib.sha256(repr(sorted(vars(cfg).items())).encode())
    for index, pixels in enumerate(images):
        content = pixel_hash(pixels)
        name = f"image_{index + 1:03d}"
        caption = captions[index] if captions is not None else ""
        if not caption:
            report.missing_captions.append(name)
        height, width = pixels.shape[:2]
        items.append(ImageItem(
            path=f"{PATH_PREFIX}/{name}#{content[:16]}", caption=insert_trigger(caption, cfg.trigger_word,
                                                                                cfg.caption_separator),
            repeats=int(cfg.default_repeats), width=int(width), height=int(height), content_hash=content,
            captioned=bool(caption), rel_path=name, pixels=pixels))
        digest.update(f"{content}\0{caption}\n".encode())
    report.folders[""] = (int(cfg.default_repeats), len(items))
    summarise(report, items, min_size)
    return Dataset(SOURCE, items, report, cfg, digest.hexdigest()[:16])
