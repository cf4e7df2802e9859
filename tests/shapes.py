"""Small real image datasets for tests and benchmarks: coloured shapes with caption files."""
from __future__ import annotations

import random
from pathlib import Path


def write_shape_dataset(folder: Path, count: int = 4, size=(64, 64), seed: int = 0, captions=None) -> Path:
    """Real PNG files with caption sidecars: coloured shapes on dark backgrounds."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 210, 40)]
    for i in range(count):
        w, h = size if isinstance(size, tuple) else size[i % len(size)]
        image = Image.new("RGB", (w, h), (rng.randint(0, 50),) * 3)
        draw = ImageDraw.Draw(image)
        box = (w * 0.2, h * 0.2, w * 0.8, h * 0.8)
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=colours[i % len(colours)])
        image.save(folder / f"img_{i:02d}.png")
        caption = captions[i] if captions else f"shape {i}, {'circle' if i % 2 else 'square'}, colour {i % 4}"
        (folder / f"img_{i:02d}.txt").write_text(caption, encoding="utf-8")
    return folder
