"""`python -m trainer demo`: a whole training run on the CPU in about a minute, before any model is downloaded.

Builds a tiny random SD1.5-shaped diffusers model and a synthetic captioned dataset (coloured shapes drawn with
Pillow), writes them as `<out>/demo_config.json`, then trains a LoRA through the same headless path as
`python -m trainer train --config FILE` (which trains that file too, also under torchrun).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")
SIZES = ((96, 96), (128, 96), (96, 128), (112, 112))


def make_demo_dataset(folder: Path, count: int = 8, seed: int = 0) -> Path:
    """Images of one shape on a plain background, each with a caption naming its colour and shape."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    images = folder / "2_shapes"  # kohya layout: 2 repeats per epoch
    images.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        width, height = SIZES[i % len(SIZES)]
        image = Image.new("RGB", (width, height), (rng.randint(0, 60),) * 3)
        draw = ImageDraw.Draw(image)
        box = (width * 0.2, height * 0.2, width * 0.8, height * 0.8)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        image.save(images / f"shape_{i:02d}.png")
        (images / f"shape_{i:02d}.txt").write_text(f"a {colour} {shape}, simple background", encoding="utf-8")
    return folder


def demo_config(out: Path, steps: int = 60) -> dict:
    return {
        "model": str(out / "model"),
        "dataset": {"folder": str(out / "dataset"), "trigger_word": "shp", "shuffle_captions": True,
                    "keep_tokens": 1},
        "buckets": {"resolutions": [96], "min_bucket": 64, "max_bucket": 128, "step": 32, "flip": True},
        "train": {"steps": steps, "batch_size": 2, "seed": 0, "save_every": 20, "keep_last": 2,
                  "network": {"rank": 8, "alpha": 8}, "ema_decay": 0.99,
                  "optimizer": {"learning_rate": 1e-3, "scheduler": "cosine", "warmup_steps": 5},
                  "objective": {"min_snr_gamma": 5.0}},
        "output": {"run_dir": str(out / "run"), "lora": str(out / "demo_lora.safetensors"),
                   "cache_dir": str(out / "cache")},
        "title": "LoRA Lab demo", "trigger_phrase": "shp",
    }


def prepare_demo(out: str | Path = "demo_output", steps: int = 60, echo=print) -> tuple[dict, Path]:
    """The model, the dataset and ``<out>/demo_config.json`` (each made only when missing or different)."""
    from ..files.atomic import write_text
    from .tiny_models import build_tiny_pipeline

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "model" / "model_index.json").is_file():
        echo(f"building a tiny random SD1.5-shaped model in {out / 'model'}")
        build_tiny_pipeline(out / "model", "sd15")
    if not (out / "dataset").is_dir():
        make_demo_dataset(out / "dataset")
    config = demo_config(out, steps)
    path, text = out / "demo_config.json", json.dumps(config, indent=1)
    if not path.is_file() or path.read_text() != text:
        write_text(path, text)
    return config, path


def run_demo(out: str | Path = "demo_output", steps: int = 60, echo=print) -> dict:
    from ..headless import HeadlessSpec, run
    from ..training import distributed
    from .threads import use_demo_threads

    with distributed.one_writer_first():  # under a launcher rank 0 builds, the others find the files
        config, _ = prepare_demo(out, steps, echo if distributed.is_main() else (lambda *a: None))
    use_demo_threads(echo if distributed.is_main() else (lambda *a: None))  # a busy machine: see threads.py
    result = run(HeadlessSpec.from_dict(config), echo=echo)
    summary = {"steps": result.step, "first_loss": result.losses[0], "last_loss": result.losses[-1],
               "lora": config["output"]["lora"], "run_dir": config["output"]["run_dir"]}
    if distributed.is_main():
        echo(f"demo finished: {json.dumps(summary)}")
    return summary
