"""Soak: does a long CPU run with caption shuffling hold a flat memory footprint?

Trains the tiny SD1.5 model (trainer/demo/tiny_models.py, widened to SD1.5's real text width) for 1000 steps on
a small synthetic dataset whose captions carry several tags each, with `shuffle_captions` and caption dropout on,
through the real loop (`trainer.training.loop.train` on the DiffusersHost) with the text cache, run log, progress
reporter and periodic snapshots all in play. The process RSS is sampled every few steps; a least-squares line over
the second half of the run (after allocator and LRU warm-up) gives the growth rate. Almost every shuffled caption
is a new string, so a cache that kept them would grow by ~2 embeddings (~460 KiB) per step: before the bounded
variant LRU this benchmark read ~680 MiB per 1000 steps.

    python bench/soak.py [--steps 1000] [--every 20]   # last line: rss_growth_mib_per_1k_steps: <n>  (goal <= 20)
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

IMAGES, TAGS_PER_CAPTION, BATCH, RESOLUTION, TEXT_WIDTH = 8, 8, 2, 64, 768
WORDS = ["red", "blue", "green", "round", "square", "small", "large", "shiny", "matte", "wooden", "metal", "old",
         "new", "striped", "dotted", "tall", "flat", "bright", "dark", "soft"]


def captions(count: int, seed: int = 0) -> list[str]:
    """Trigger word first, then TAGS_PER_CAPTION tags: 8! orders each, so shuffled captions almost never repeat."""
    rng = random.Random(seed)
    return [", ".join(["shp"] + [f"{w} {i}" for w in rng.sample(WORDS, TAGS_PER_CAPTION)]) for i in range(count)]


def widen_text(folder: Path) -> Path:
    """Give the tiny model SD1.5's real text width (768), so each caption embedding has the real size (77 x 768
    float32 = 231 KiB) and memory held per caption shows in RSS as it would on a real model."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from trainer.demo.tiny_models import text_encoder_config, unet_config

    torch.manual_seed(0)
    CLIPTextModel(text_encoder_config(hidden=TEXT_WIDTH, layers=1)).save_pretrained(folder / "text_encoder")
    unet = UNet2DConditionModel(**{**unet_config("sd15"), "cross_attention_dim": TEXT_WIDTH})
    with torch.no_grad():  # as build_tiny_pipeline: no zero-initialised output layers
        for p in unet.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.02)
    unet.save_pretrained(folder / "unet")
    return folder


def build(tmp: Path):
    from shapes import write_shape_dataset

    from trainer.config import BucketConfig, DatasetConfig
    from trainer.data.cache import prepare_latents
    from trainer.data.dataset import scan_dataset
    from trainer.demo.tiny_models import build_tiny_pipeline
    from trainer.hosts.diffusers_host import DiffusersHost

    host = DiffusersHost(widen_text(build_tiny_pipeline(tmp / "model", "sd15")))
    folder = write_shape_dataset(tmp / "data", IMAGES, size=(RESOLUTION, RESOLUTION), captions=captions(IMAGES))
    dataset_cfg = DatasetConfig(folder=str(folder), trigger_word="shp", shuffle_captions=True, keep_tokens=1,
                                caption_dropout=0.05)
    buckets = BucketConfig(resolutions=[RESOLUTION], min_bucket=32, max_bucket=RESOLUTION * 2, step=32, flip=True)
    latents = prepare_latents(scan_dataset(dataset_cfg), buckets, host.encode_images, host.image_encoder_id,
                              tmp / "cache")
    return host, latents, dataset_cfg


def config(steps: int):
    from trainer.config import TrainConfig

    return TrainConfig.from_dict({"steps": steps, "batch_size": BATCH, "seed": 0, "save_every": 250, "keep_last": 2,
                                  "network": {"rank": 4, "alpha": 4, "targets": "transformer"},
                                  "optimizer": {"learning_rate": 1e-4, "scheduler": "cosine", "warmup_steps": 10}})


def slope_per_1k(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (step, MiB), scaled to MiB per 1000 steps."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    cov = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return 1000.0 * cov / var if var else 0.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=20, help="sample RSS every N steps")
    args = parser.parse_args(argv)

    import psutil
    import torch

    from trainer.monitor.events import ProgressReporter, fanout
    from trainer.monitor.runlog import RunLog
    from trainer.training.loop import Hooks, train

    torch.set_num_threads(1)  # tiny model: threads only add noise on a shared machine
    proc = psutil.Process()
    samples: list[tuple[int, float]] = []

    def on_step(step: int, loss: float, lr: float) -> None:
        if step % args.every == 0:
            samples.append((step, proc.memory_info().rss / 2**20))

    with tempfile.TemporaryDirectory(prefix="loralab-bench-soak-") as tmp_name:
        tmp = Path(tmp_name)
        host, latents, dataset_cfg = build(tmp)
        run_dir = tmp / "run"
        print(f"{IMAGES} images at {RESOLUTION}px, {TAGS_PER_CAPTION} shuffled tags per caption, batch {BATCH}, "
              f"{args.steps} steps, RSS every {args.every} steps, {torch.get_num_threads()} thread(s)")
        start = time.perf_counter()
        with RunLog(run_dir) as runlog:
            reporter = ProgressReporter(fanout(lambda payload: None, runlog.write_latest), node="soak",
                                        run=run_dir.name, total=args.steps)
            train(host, latents, config(args.steps), run_dir, dataset_cfg=dataset_cfg, text_cache_dir=tmp / "text",
                  reporter=reporter, runlog=runlog, hooks=Hooks(on_step=on_step))
        seconds = time.perf_counter() - start
        text_files = sum(1 for _ in (tmp / "text").rglob("*.safetensors"))
    second_half = [(s, m) for s, m in samples if s > args.steps // 2]
    for step, mib in samples[:: max(1, len(samples) // 10)] + samples[-1:]:
        print(f"  step {step:>5}: RSS {mib:8.1f} MiB")
    print(f"{seconds:.0f} s ({seconds / args.steps * 1000:.1f} ms/step); text cache files: {text_files} "
          f"(captions as written: {IMAGES} + the empty caption)")
    print(f"RSS {samples[0][1]:.1f} -> {samples[-1][1]:.1f} MiB; "
          f"fit over steps {second_half[0][0]}-{second_half[-1][0]}")
    growth = slope_per_1k(second_half)
    print(f"rss_growth_mib_per_1k_steps: {growth:.2f}")
    return 0 if growth <= 20 else 1


if __name__ == "__main__":
    sys.exit(main())
