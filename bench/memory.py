"""Memory estimate vs measured peak, one fresh process per configuration.

Each configuration runs in its own subprocess so its peak is its own: the child builds a diffusers
UNet2DConditionModel of 81 M parameters at random (SD1.5 layout at 0.3x width: blocks 96/192/384/384, two layers
per block, cross-attention; big enough that weights, adapters, optimizer state and activations all matter against
the ~0.4 GiB interpreter baseline), puts it in a DiffusersHost (the tiny text encoder and VAE of
trainer/demo/tiny_models.py; latents are synthetic), asks ``trainer.preflight.memory.estimate_training_memory`` for the estimate,
then trains a few steps with the real engine step -- ``trainer.training.loop.train`` (LoRANetwork hooks, build_optimizer,
autocast, checkpointing, the loss, clipping, the scheduler, the final state snapshot) -- and reports its peak:

* CPU: peak resident set size of the process (``ru_maxrss``) against ``estimate.total`` (which includes the process
  baseline measured at estimate time and the allocator slack);
* CUDA (when available): ``torch.cuda.max_memory_allocated`` against ``estimate.tensor_total`` (the estimate less
  the CUDA context and allocator slack, which that counter does not see).

    python bench/memory.py                 # Markdown table, last line: worst_error: <percent>   (goal <= 15 %)
    python bench/memory.py --quick         # two small CPU rows (a smoke run)
    python bench/memory.py --calibrate     # also prints the CPU heap slack each row implies
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(96, 192, 384, 384),
            cross_attention_dim=32, attention_head_dim=8)  # 32 = the tiny text encoder's width
STEPS = 2
UNET_PARAMS = "76 M"  # sum of the parameters of UNET (printed by each child as "params")

# name, resolution, batch, rank, checkpointing, mixed precision, optimizer, preset
CPU_CONFIGS = [
    ("256px b1 r16", 256, 1, 16, False, "no", "adamw", "transformer"),
    ("512px b1 r16", 512, 1, 16, False, "no", "adamw", "transformer"),
    ("512px b2 r32 ckpt", 512, 2, 32, True, "no", "adamw", "transformer"),
    ("384px b4 r32 full", 384, 4, 32, False, "no", "sgd", "full"),
    ("512px b2 r16 bf16", 512, 2, 16, False, "bf16", "adamw", "transformer"),
]
QUICK_CONFIGS = CPU_CONFIGS[:1] + [("256px b2 r8 ckpt", 256, 2, 8, True, "no", "adamw", "transformer")]
GPU_CONFIGS = [
    ("512px b1 r16", 512, 1, 16, False, "no", "adamw", "transformer"),
    ("1024px b2 r32", 1024, 2, 32, False, "bf16", "adamw", "transformer"),
    ("1024px b4 r32 ckpt", 1024, 4, 32, True, "bf16", "adamw", "full"),
    ("768px b4 r16 bf16", 768, 4, 16, False, "bf16", "adafactor", "transformer"),
]


def child(spec: dict) -> dict:
    """Runs in the fresh subprocess: estimate, then train, then report the peak."""
    import torch

    torch.set_num_threads(int(spec.get("threads", 2)))
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    from trainer.config import TrainConfig
    from trainer.data.cache import LatentSample, LatentSet
    from trainer.hosts.diffusers_host import DiffusersHost
    from trainer.preflight.memory import estimate_training_memory
    from trainer.training.loop import train

    device = spec["device"]
    host = DiffusersHost(spec["model"], device=device)
    torch.manual_seed(0)
    host.unet = UNet2DConditionModel(**UNET).requires_grad_(False).to(device)
    host.unet.eval()
    res, batch = spec["resolution"], spec["batch"]
    cfg = TrainConfig.from_dict({
        "steps": STEPS, "batch_size": batch, "seed": 0, "save_every": 0, "keep_last": 1,
        "mixed_precision": spec["mp"], "gradient_checkpointing": spec["ckpt"],
        "network": {"rank": spec["rank"], "alpha": spec["rank"], "targets": spec["preset"],
                    "conv_rank": spec["rank"] // 2 if spec["preset"] == "full" else 0},
        "optimizer": {"name": spec["optimizer"], "learning_rate": 1e-4, "scheduler": "constant"}})
    gen = torch.Generator().manual_seed(0)
    samples = [LatentSample(latent=torch.randn(4, res // 8, res // 8, generator=gen), latent_flipped=None,
                            caption=f"sample {i}", repeats=1, bucket=(res, res), resolution=res,
                            original_size=(res, res), crop_top_left=(0, 0), crop_top_left_flipped=None,
                            image_path=f"s{i}.png") for i in range(max(4, batch * STEPS))]
    latents = LatentSet(samples=samples, report=None)
    before = _rss()
    t0 = time.perf_counter()
    est = estimate_training_memory(host, cfg, [(res, res)], batch, resident_encoders=True)
    est_seconds = time.perf_counter() - t0
    estimator_overhead = max(0, _peak_rss() - before)
    # The training peak is what the estimate predicts: forget the estimator's own (smaller) high-water mark.
    peak_reset = _reset_peak_rss()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        train(host, latents, cfg, run_dir)
    train_seconds = time.perf_counter() - t0
    if device.startswith("cuda"):
        measured = int(torch.cuda.max_memory_allocated())
        estimated = est.tensor_total
    else:
        measured = _peak_rss()
        estimated = est.total
    acts = sum(v for k, v in est.breakdown.items() if k.startswith("activations"))
    slack = sum(v for k, v in est.breakdown.items() if "allocator slack" in k)
    return {"estimated": int(estimated), "measured": measured, "activations": int(acts), "slack": int(slack),
            "est_seconds": est_seconds, "train_seconds": train_seconds, "verdict": est.verdict,
            "estimator_overhead": int(estimator_overhead), "peak_reset": peak_reset,
            "breakdown": {k: int(v) for k, v in est.breakdown.items()},
            "params": sum(p.numel() for p in host.unet.parameters())}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    try:
        return _status_kib("VmRSS:")
    except OSError:
        return 0


def _peak_rss() -> int:
    """Peak RSS since the last reset (Linux VmHWM), else since the process started (ru_maxrss)."""
    try:
        return _status_kib("VmHWM:")
    except OSError:
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_config(row, device: str, model: Path, threads: int) -> dict:
    name, res, batch, rank, ckpt, mp, optimizer, preset = row
    spec = {"device": device, "model": str(model), "resolution": res, "batch": batch, "rank": rank, "ckpt": ckpt,
            "mp": mp, "optimizer": optimizer, "preset": preset, "threads": threads}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"configuration {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def gib(n: int) -> str:
    return f"{n / 1024 ** 3:.2f} GiB"


def header(device: str, calibrate: bool) -> None:
    counter = "peak RSS" if device == "cpu" else "max_memory_allocated"
    print(f"\n### {device.upper()}: estimate vs measured {counter} (UNet {UNET_PARAMS} params, {STEPS} steps of "
          f"trainer.training.loop.train, one fresh process per row)\n")
    head = "| config | estimated | measured | error % | activations | estimator's own peak | estimate s | train s |"
    if calibrate:
        head += " slack: estimated / implied MiB |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1), flush=True)


def row_line(name: str, r: dict, calibrate: bool) -> tuple[str, float]:
    err = 100.0 * (r["estimated"] - r["measured"]) / r["measured"]
    line = (f"| {name} | {gib(r['estimated'])} | {gib(r['measured'])} | {err:+.1f} | {gib(r['activations'])} | "
            f"+{r['estimator_overhead'] / 2 ** 20:.0f} MiB | {r['est_seconds']:.1f} | {r['train_seconds']:.0f} |")
    if calibrate:
        base = r["estimated"] - r["slack"]
        line += f" {r['slack'] / 2 ** 20:.0f} / {(r['measured'] - base) / 2 ** 20:.0f} |"
    return line, abs(err)


def run_table(configs, device: str, model: Path, threads: int, calibrate: bool) -> float:
    header(device, calibrate)
    worst = 0.0
    for row in configs:
        line, err = row_line(row[0], run_config(row, device, model, threads), calibrate)
        worst = max(worst, err)
        print(line, flush=True)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="two small CPU rows")
    parser.add_argument("--calibrate", action="store_true", help="print the heap slack each CPU row implies")
    parser.add_argument("--no-cpu", action="store_true", help="GPU rows only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated row numbers (1-based) to run")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    import torch

    from trainer.demo.tiny_models import build_tiny_pipeline

    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_pipeline(Path(tmp) / "tiny", "sd15")
        if not args.no_cpu:
            configs = QUICK_CONFIGS if args.quick else CPU_CONFIGS
            if args.only:
                configs = [configs[int(i) - 1] for i in args.only.split(",")]
            worst = max(worst, run_table(configs, "cpu", model, args.threads, args.calibrate))
        if torch.cuda.is_available():
            worst = max(worst, run_table(GPU_CONFIGS, "cuda", model, args.threads, args.calibrate))
        else:
            print("\n(no CUDA device: GPU rows skipped)")
    print(f"\nworst_error: {worst:.1f}%")


if __name__ == "__main__":
    main()
