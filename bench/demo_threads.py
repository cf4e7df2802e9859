"""The demo's step time on a busy machine: torch's default thread count vs the one the demo picks (threads.py).

Builds the demo (tiny SD1.5-shaped model, its synthetic dataset and settings), then times the same training steps
three ways, alternating, median seconds per step:

* idle floor: the machine as it is, with the thread count the demo picks there;
* busy, default: every usable core kept busy by a spinning process (another job, other users), torch's default
  thread count (one per core);
* busy, chosen: the same load, the thread count ``demo_threads()`` picks under it.

    python bench/demo_threads.py      # last line: busy_default_over_chosen: <ratio>  (how much the choice saves)
"""
from __future__ import annotations

import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS, WARMUP, ROUNDS = 8, 2, 3


def spin(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def build(tmp: Path):
    from trainer.config import BucketConfig, DatasetConfig, TrainConfig
    from trainer.data.cache import prepare_latents
    from trainer.data.dataset import scan_dataset
    from trainer.demo import demo_config, make_demo_dataset
    from trainer.demo.tiny_models import build_tiny_pipeline
    from trainer.hosts.diffusers_host import DiffusersHost

    host = DiffusersHost(build_tiny_pipeline(tmp / "model", "sd15"))
    config = demo_config(tmp)
    make_demo_dataset(tmp / "dataset")
    dataset_cfg = DatasetConfig(**config["dataset"])
    buckets = BucketConfig(**config["buckets"])
    latents = prepare_latents(scan_dataset(dataset_cfg), buckets, host.encode_images, host.image_encoder_id,
                              tmp / "cache" / "latents")
    train = dict(config["train"], steps=STEPS, save_every=0)
    return host, latents, dataset_cfg, TrainConfig.from_dict(train)


def seconds_per_step(host, latents, dataset_cfg, cfg, threads: int, tmp: Path) -> float:
    import torch

    from trainer.training.loop import Hooks, train

    torch.set_num_threads(threads)
    times: list[float] = []

    def on_step(step, loss, lr):
        times.append(time.perf_counter())

    run_dir = Path(tempfile.mkdtemp(dir=tmp))
    train(host, latents, cfg, run_dir, dataset_cfg=dataset_cfg, text_cache_dir=tmp / "cache" / "text",
          hooks=Hooks(on_step=on_step))
    steps = [b - a for a, b in zip(times[WARMUP:], times[WARMUP + 1:])]
    return statistics.median(steps)


def main() -> None:
    import torch

    from trainer.demo.threads import demo_threads, usable_cpus

    default_threads = torch.get_num_threads()
    cpus = usable_cpus()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        host, latents, dataset_cfg, cfg = build(tmp)
        idle_threads = demo_threads()
        stop = multiprocessing.Event()
        load = [multiprocessing.Process(target=spin, args=(stop,), daemon=True) for _ in range(cpus)]
        results = {"idle floor": [], "busy, default": [], "busy, chosen": []}
        chosen = None
        for _ in range(ROUNDS):
            results["idle floor"].append(seconds_per_step(host, latents, dataset_cfg, cfg, idle_threads, tmp))
        for p in load:
            p.start()
        try:
            time.sleep(1.0)
            chosen = demo_threads()  # what the demo picks with every core busy
            for _ in range(ROUNDS):
                results["busy, default"].append(seconds_per_step(host, latents, dataset_cfg, cfg, default_threads, tmp))
                results["busy, chosen"].append(seconds_per_step(host, latents, dataset_cfg, cfg, chosen, tmp))
        finally:
            stop.set()
            for p in load:
                p.join(timeout=5)
    median = {k: statistics.median(v) for k, v in results.items()}
    print(f"demo model, batch {cfg.batch_size}, {cpus} usable CPU(s), {cpus} spinning process(es) for 'busy'; "
          f"threads: default {default_threads}, picked idle {idle_threads}, picked busy {chosen}; "
          f"{STEPS - WARMUP - 1} timed steps x {ROUNDS} rounds")
    floor = median["idle floor"]
    for name, value in median.items():
        print(f"  {name:14s} {value * 1000:8.1f} ms/step  ({value / floor:.2f}x the idle floor)")
    print(f"busy_default_over_chosen: {median['busy, default'] / median['busy, chosen']:.2f}")


if __name__ == "__main__":
    main()
