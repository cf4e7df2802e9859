"""Latent cache benchmark: a second caching pass over an unchanged dataset must encode nothing and take <= 1 s.

    python bench/cache.py [--images 100] [--resolution 512]

Makes photo-like PNG/JPEG images (256-768 px, varied aspect ratios) in a temporary folder, scans it, runs
prepare_latents twice with a tiny random VAE, and prints both passes. The last line is `second_pass_s: <s>`.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo root holds trainer/

from tests.messy import photo_like, tiny_vae_encoder  # noqa: E402
from trainer.config import BucketConfig, DatasetConfig  # noqa: E402
from trainer.data.cache import prepare_latents  # noqa: E402
from trainer.data.dataset import scan_dataset  # noqa: E402


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    for i in range(count):
        w, h = rng.randint(256, 768), rng.randint(256, 768)
        img = photo_like(w, h, seed=i)
        if i % 2:
            img.save(folder / f"img{i:03d}.jpg", quality=90)
        else:
            img.save(folder / f"img{i:03d}.png", compress_level=1)
        (folder / f"img{i:03d}.txt").write_text(f"photo {i}, tag a, tag b", encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="loralab-bench-cache-") as tmp:
        data, cache = Path(tmp) / "data", Path(tmp) / "cache"
        data.mkdir()
        t = time.perf_counter()
        make_images(data, args.images)
        print(f"generated {args.images} images in {time.perf_counter() - t:.2f} s")

        t = time.perf_counter()
        dataset = scan_dataset(DatasetConfig(folder=str(data)), min_size=args.resolution)
        scan_s = time.perf_counter() - t
        encoder = tiny_vae_encoder()
        buckets = BucketConfig(resolutions=[args.resolution], max_bucket=2 * args.resolution)

        def run():
            start = time.perf_counter()
            result = prepare_latents(dataset, buckets, encoder, "tiny-vae", cache, batch_size=args.batch_size)
            return result, time.perf_counter() - start

        first, first_s = run()
        encoded_before = encoder.images
        second, second_s = run()
        t = time.perf_counter()
        rescan = scan_dataset(DatasetConfig(folder=str(data)), min_size=args.resolution)
        rescan_s = time.perf_counter() - t
        print(f"scan: {scan_s:.3f} s ({len(dataset.items)} images); rescan: {rescan_s:.3f} s")
        print(f"first pass:  {first_s:.3f} s, encoded {first.stats.encoded}, hits {first.stats.hits}, "
              f"{encoder.calls} encoder call(s)")
        print(f"second pass: {second_s:.3f} s, encoded {second.stats.encoded}, hits {second.stats.hits}, "
              f"{encoder.images - encoded_before} image(s) sent to the encoder "
              f"({1000 * second_s / max(1, second.stats.hits):.2f} ms per hit)")
        print(first.report.buckets.to_text())
        print(f"cache: {sum(1 for _ in cache.rglob('*.safetensors'))} entries, "
              f"{sum(p.stat().st_size for p in cache.rglob('*.safetensors')) / 1e6:.1f} MB")
        ok = second.stats.encoded == 0 and encoder.images == encoded_before and second_s <= 1.0
        print(f"second_pass_s: {second_s:.3f}")
    return 0 if ok and len(rescan.items) == args.images else 1


if __name__ == "__main__":
    sys.exit(main())
