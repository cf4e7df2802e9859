"""Test helpers: a deliberately messy dataset folder, photo-like images, and a tiny random VAE encoder.

Used by tests/test_dataset.py, tests/test_cache.py and bench/cache.py. Everything is generated with Pillow and
numpy; nothing is downloaded.
"""
from __future__ import annotations

import functools
import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


def photo_like(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Smooth colour fields with some fine detail: compresses like a photo, cheap to make at any size."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BILINEAR)
    detail = Image.fromarray(rng.integers(0, 256, (max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8))
    img = Image.blend(coarse, detail.resize((width, height), Image.BILINEAR), 0.25)
    return img.convert(mode) if mode != "RGB" else img


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@dataclass
class Messy:
    root: Path
    usable: set[str] = field(default_factory=set)  # relative paths of images that must be kept
    unreadable: set[str] = field(default_factory=set)
    missing_captions: set[str] = field(default_factory=set)
    orphan_captions: set[str] = field(default_factory=set)
    repeats: dict[str, int] = field(default_factory=dict)


def build_messy_folder(root: Path) -> Messy:
    """Every problem a real dataset folder has, each in one named file."""
    root.mkdir(parents=True, exist_ok=True)
    m = Messy(root)

    def image(rel: str, data: bytes, caption: str | bytes | None = None, repeats: int = 1, ok: bool = True):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if caption is not None:
            text = caption if isinstance(caption, bytes) else caption.encode("utf-8")
            path.with_suffix(".txt").write_bytes(text)
        if ok:
            m.usable.add(rel)
            m.repeats[rel] = repeats
        else:
            m.unreadable.add(rel)

    png = encoded(photo_like(320, 240, 1), "PNG")
    image("good.png", png, "a red bus, city street")
    image("dup_of_good.png", png, "the same picture again")  # byte-identical duplicate
    image("10_ohwx/photo.jpg", encoded(photo_like(400, 300, 2), "JPEG", quality=90), "ohwx on a beach", 10)
    image("10_ohwx/nested/deep.png", encoded(photo_like(300, 400, 3), "PNG"), "ohwx portrait", 10)
    image("10_ohwx/5_more/five.bmp", encoded(photo_like(256, 256, 4), "BMP"), "ohwx, indoors", 5)
    image("abc_plain/plain.webp", encoded(photo_like(360, 240, 5), "WEBP"), "a dog", 1)
    image("no_caption.png", encoded(photo_like(256, 320, 6), "PNG"))
    m.missing_captions.add("no_caption.png")
    image("latin.png", encoded(photo_like(300, 300, 7), "PNG"), "caf\u00e9 au lait".encode("cp1252"))
    image("bom.png", encoded(photo_like(300, 280, 8), "PNG"), b"\xef\xbb\xbfcaption with a BOM")
    image("blank.png", encoded(photo_like(280, 300, 9), "PNG"), "  \n\t  ")
    m.missing_captions.add("blank.png")
    image("tiny.png", encoded(photo_like(16, 16, 10), "PNG"), "a tiny image")
    image("huge.jpg", encoded(photo_like(6000, 4000, 11), "JPEG", quality=85), "a very large photo")
    image("cmyk.jpg", encoded(Image.new("CMYK", (200, 300), (0, 255, 255, 0)), "JPEG"), "a red card")
    grey16 = np.tile(np.linspace(0, 65535, 256, dtype=np.uint16), (200, 1))
    image("grey16.png", encoded(Image.fromarray(grey16), "PNG"), "a grey ramp")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    image("rotated.jpg", encoded(photo_like(300, 200, 12), "JPEG", exif=exif), "a rotated photo")

    full_png = encoded(photo_like(300, 300, 13), "PNG")
    full_jpg = encoded(photo_like(300, 300, 14), "JPEG")
    image("corrupt.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "broken", ok=False)
    image("truncated.png", full_png[: len(full_png) // 2], "half a png", ok=False)
    image("truncated.jpg", full_jpg[: len(full_jpg) // 2], "half a jpeg", ok=False)
    image("empty.jpg", b"", ok=False)

    (root / "orphan.txt").write_text("a caption whose image is gone", encoding="utf-8")
    m.orphan_captions.add("orphan.txt")
    (root / "notes.md").write_text("not part of the dataset", encoding="utf-8")
    (root / ".hidden.png").write_bytes(b"not even looked at")
    return m


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def tiny_vae_encoder(seed: int = 0):
    """A random AutoencoderKL shaped like SD's (4 latent channels, 8x downsampling) but with 8-16 channels,
    wrapped like Host.encode_images: (B, H, W, 3) in [0, 1] -> latent mean (B, 4, H/8, W/8).
    The wrapper counts its calls and images (`.calls`, `.images`)."""
    import torch

    vae = _tiny_vae(seed)

    def encode_images(images: "torch.Tensor") -> "torch.Tensor":
        encode_images.calls += 1
        encode_images.images += images.shape[0]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # convs this small run 10x faster on one thread when the machine is busy
        try:
            with torch.no_grad():
                x = images.permute(0, 3, 1, 2) * 2 - 1
                return vae.encode(x).latent_dist.mean.float()
        finally:
            torch.set_num_threads(threads)

    encode_images.calls = 0
    encode_images.images = 0
    return encode_images


@functools.lru_cache(maxsize=None)
def _tiny_vae(seed: int):
    """Built once per process (importing diffusers costs seconds); each caller gets its own counting wrapper."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    ).eval()
