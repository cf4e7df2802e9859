"""Reading training images: any common file in, an RGB uint8 PIL image out, or one clear error.

Three entry points, from cheapest to dearest:

* :func:`read_size` parses the header only (EXIF orientation applied to the size).
* :func:`check_image` is what the dataset scan runs: header + an integrity check that avoids a full decode where the
  format allows it (PNG chunk CRCs, the JPEG end-of-image marker). A file that still fails later, at caching time,
  is skipped and reported by the cache.
* :func:`load_image` decodes, applies EXIF orientation and converts every mode to RGB; for JPEG it lets libjpeg
  decode at 1/2, 1/4 or 1/8 scale when the target is that much smaller (``Image.draft``), which is most of the
  speed of the data path.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import TrainingError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
_WHITE = (255, 255, 255)

Source = Union[str, os.PathLike, bytes]


class ImageReadError(TrainingError):
    """A file that cannot be used as a training image; `reason` is meant for the user."""

    def __init__(self, path: Union[str, os.PathLike], reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_file(name: Union[str, os.PathLike]) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def read_size(source: Source, path: Optional[str] = None) -> tuple[int, int]:
    """(width, height) as the image will be seen, i.e. after EXIF orientation, from the header only."""
    with _open(source, path) as img:
        return _oriented_size(img)


def check_image(data: bytes, path: Union[str, os.PathLike]) -> tuple[int, int]:
    """Validate an image file's bytes without a full decode where possible; returns the oriented (w, h).

    PNG: ``verify()`` walks every chunk and checks its CRC, which catches truncation and bit rot.
    JPEG: a complete file ends with the EOI marker; only files without it pay for a 1/8-scale decode,
    which still reads all the entropy-coded data and so detects a truncated stream.
    Other formats (WebP, BMP) are rare in datasets and decoded fully.
    """
    with _open(data, path) as img:
        size = _oriented_size(img, data)
        with _translate_errors(path):
            if img.format == "JPEG":
                if not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
                    img.draft(None, (max(1, img.width // 8), max(1, img.height // 8)))
                    img.load()
            elif img.format != "PNG":
                img.load()
    if img.format == "PNG":
        with _open(data, path) as fresh, _translate_errors(path):
            fresh.verify()  # must be the first thing done with an opened PNG; reading EXIF above spoils that
    return size


def load_image(
    source: Source, path: Optional[str] = None, target_size: Optional[tuple[int, int]] = None
) -> Image.Image:
    """Decode to an RGB uint8 image with EXIF orientation applied.

    `target_size` (w, h, after orientation) is the size the caller will resize to; a JPEG may then be decoded at a
    reduced scale that is still at least that large. `path` names the file in errors when `source` is bytes.
    """
    with _open(source, path) as img:
        with _translate_errors(path or source):
            if target_size is not None and img.format == "JPEG":
                tw, th = target_size
                if _orientation(img) in _SWAPS_AXES:
                    tw, th = th, tw
                img.draft(None, (max(1, tw), max(1, th)))  # libjpeg picks the largest reduction still >= target
            img.load()
            orientation = _orientation(img)  # after load(): a PNG's eXIf chunk may follow the pixel data
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
            return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB uint8. Transparency is composited on white; 16-bit data is scaled, not clipped."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_bit_depth_to_rgb(img)
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA" if ("transparency" in img.info or mode == "PA") else "RGB")
    elif mode in ("LA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        # Transparent pixels hold arbitrary colours (often black); white is what a viewer shows for them.
        background = Image.new("RGB", img.size, _WHITE)
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")  # L, 1, CMYK (naive, like ComfyUI's LoadImage), YCbCr, ...


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    # Pillow's own I;16 -> L conversion clips at 255 instead of scaling, which turns most images white.
    values = np.asarray(img)
    if img.mode == "F":
        scaled = np.clip(values, 0, 255)
    else:  # I;16* and I (older Pillow opens 16-bit PNG as "I"): full range is 0..65535
        scaled = np.clip(values.astype(np.float64), 0, 65535) * (255.0 / 65535.0)
    grey = Image.fromarray(np.rint(scaled).astype(np.uint8))
    return grey.convert("RGB")


def _open(source: Source, path: Optional[Union[str, os.PathLike]]) -> Image.Image:
    name = str(path) if path is not None else (str(source) if not isinstance(source, bytes) else "<bytes>")
    if isinstance(source, bytes):
        if not source:
            raise ImageReadError(name, "empty file (0 bytes)")
        stream: Union[io.BytesIO, str] = io.BytesIO(source)
    else:
        try:
            if os.path.getsize(source) == 0:
                raise ImageReadError(name, "empty file (0 bytes)")
        except OSError as e:
            raise ImageReadError(name, f"cannot open ({e.strerror or e})") from e
        stream = os.fspath(source)
    with _translate_errors(name):
        return Image.open(stream)


def _orientation(img: Image.Image, data: Optional[bytes] = None) -> int:
    """EXIF orientation without decoding: Pillow's PNG getexif() decodes the whole image to look for an eXIf
    chunk after the pixel data, so that search is skipped unless the bytes contain one (or the PNG is loaded)."""
    try:
        if img.format == "PNG" and "exif" not in img.info and (data is None or b"eXIf" not in data):
            return 1
        return int(img.getexif().get(ORIENTATION_TAG, 1) or 1)
    except Exception:  # malformed EXIF never makes an image unusable
        return 1


def _oriented_size(img: Image.Image, data: Optional[bytes] = None) -> tuple[int, int]:
    w, h = img.size
    return (h, w) if _orientation(img, data) in _SWAPS_AXES else (w, h)


class _translate_errors:
    """Turn Pillow's assorted exceptions into ImageReadError with a reason a user understands."""

    def __init__(self, path):
        self.path = str(path) if not isinstance(path, bytes) else "<bytes>"

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or isinstance(error, ImageReadError) or not isinstance(error, Exception):
            return False
        raise ImageReadError(self.path, _reason(error)) from error


def _reason(error: BaseException) -> str:
    message = str(error)
    if isinstance(error, Image.DecompressionBombError):
        return f"image too large to decode safely ({message})"
    if isinstance(error, UnidentifiedImageError):
        return "not a readable image (unknown format or corrupt header)"
    if isinstance(error, EOFError) or "truncated" in message.lower():
        return "truncated: the file ends before the image data does"
    if isinstance(error, (FileNotFoundError, PermissionError)):
        return f"cannot open ({error.strerror or message})"
    return f"corrupt image data ({type(error).__name__}: {message})"
