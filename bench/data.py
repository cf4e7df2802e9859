"""Data-path benchmark: scan + decode + resize + crop, against a plain Pillow floor on the same files.

    python bench/data.py [--images 200] [--resolution 512] [--repeats 3]

Generates photo-like JPEG and PNG images (mixed sizes, long side up to ~2000 px) in a temporary folder.
* ours:  scan_dataset (reads every file once: sha256 + integrity check) then, per image, the caching path's
         `training_image` (read, hash check, JPEG reduced-scale decode, EXIF, RGB, Lanczos resize, crop).
* floor: Image.open -> convert("RGB") -> resize(LANCZOS) to the same resized size, nothing else.
Both run single-threaded (the scan's thread pool is set to one worker) and alternate, `--repeats` times each;
the best time of each side is kept. The last line is `data_over_floor: <ours / floor>` (goal <= 1.2).
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo root holds trainer/

from PIL import Image  # noqa: E402

from tests.messy import photo_like  # noqa: E402
from trainer.config import BucketConfig, DatasetConfig  # noqa: E402
from trainer.data.buckets import Bucketer  # noqa: E402
from trainer.data.cache import training_image  # noqa: E402
from trainer.data.dataset import scan_dataset  # noqa: E402


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    for i in range(count):
        long_side = rng.randint(600, 2000)
        aspect = rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 2.0])
        w, h = long_side, max(64, int(long_side / aspect))
        if rng.random() < 0.5:
            w, h = h, w
        img = photo_like(w, h, seed=i)
        if i % 3 == 2:
            img.save(folder / f"img{i:03d}.png", compress_level=1)  # fast to make; decodes like any PNG
        else:
            img.save(folder / f"img{i:03d}.jpg", quality=90)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="loralab-bench-data-") as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        make_images(folder, args.images)
        print(f"generated {args.images} images in {time.perf_counter() - t:.1f} s "
              f"({sum(p.stat().st_size for p in folder.iterdir()) / 1e6:.0f} MB)")
        cfg = DatasetConfig(folder=str(folder))
        bucketer = Bucketer(BucketConfig(resolutions=[args.resolution]))
        reference = scan_dataset(cfg, workers=1)
        targets = [(item.path, bucketer.plans((item.width, item.height))[0].resized_size) for item in reference.items]

        def ours() -> int:
            dataset = scan_dataset(cfg, workers=1)
            done = 0
            for item in dataset.items:
                plan = bucketer.plans((item.width, item.height), item.content_hash)[0]
                done += training_image(item, plan).size == plan.bucket
            return done

        def floor() -> int:
            done = 0
            for path, size in targets:
                with Image.open(path) as img:
                    done += img.convert("RGB").resize(size, Image.Resampling.LANCZOS).size == size
            return done

        times: dict[str, list[float]] = {"floor": [], "ours": []}
        for _ in range(args.repeats):
            for name, fn in (("floor", floor), ("ours", ours)):
                start = time.perf_counter()
                assert fn() == args.images
                times[name].append(time.perf_counter() - start)
        best = {name: min(values) for name, values in times.items()}
        for name in ("floor", "ours"):
            runs = ", ".join(f"{v:.2f}" for v in times[name])
            print(f"{name:>5}: best {best[name]:.2f} s = {args.images / best[name]:.1f} images/s (runs: {runs})")
        ratio = best["ours"] / best["floor"]
        print(f"data_over_floor: {ratio:.3f}")
    return 0 if ratio <= 1.2 else 1


if __name__ == "__main__":
    sys.exit(main())
