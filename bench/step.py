"""Our full training step vs the bare floor, measured in the same run; and each adapter algorithm against it.

Ours: `trainer.training.loop.train` — batch sampling, caption handling, text lookup, timestep/noise sampling, forward,
loss, backward, gradient clipping, AdamW, LR schedule, RNG bookkeeping, run log and progress events.
Floor: plain forward + backward + AdamW on the same model with the same LoRA adapters and the same batch shapes.
Algorithm rows: the same `train` with network.algorithm loha / lokr / dora at the same rank, against the same floor
and against our LoRA step (goal: no algorithm slower than 1.5x LoRA without a reason in the README).
Everything runs a few times, alternating; each run's median step time, then the median over the runs, is compared.

    python bench/step.py            # last line: step_over_floor: <ratio>   (goal <= 1.10 on the CPU)
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

STEPS, WARMUP, ROUNDS, BATCH, RESOLUTION = 14, 4, 3, 2, 256
# "lora" is ours; the others are its rows. LoKr's small factor is 2 wide so that rank 16 fits this model's 32-wide
# cross-attention inputs (the default balanced split of 32 is 4 x 8, whose large side allows rank 8 at most).
ALGORITHMS = {"lora": {}, "loha": {}, "lokr": {"lokr_factor": 2}, "dora": {}}


def build(tmp: Path):
    import torch
    from diffusers import UNet2DConditionModel
    from shapes import write_shape_dataset

    from trainer.config import BucketConfig, DatasetConfig
    from trainer.data.cache import prepare_latents
    from trainer.data.dataset import scan_dataset
    from trainer.demo.tiny_models import build_tiny_pipeline
    from trainer.hosts.diffusers_host import DiffusersHost

    host = DiffusersHost(build_tiny_pipeline(tmp / "model", "sd15"))
    torch.manual_seed(0)
    # A small but not toy UNet, so per-step bookkeeping is measured against real compute.
    host.unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    ).requires_grad_(False)
    folder = write_shape_dataset(tmp / "data", 8, size=(RESOLUTION, RESOLUTION))
    dataset_cfg = DatasetConfig(folder=str(folder))
    buckets = BucketConfig(resolutions=[RESOLUTION], min_bucket=128, max_bucket=512, step=64)
    latents = prepare_latents(scan_dataset(dataset_cfg), buckets, host.encode_images, host.image_encoder_id,
                              tmp / "cache")
    return host, latents, dataset_cfg


def config(algorithm: str = "lora"):
    from trainer.config import TrainConfig

    return TrainConfig.from_dict({"steps": STEPS, "batch_size": BATCH, "seed": 0, "save_every": 0,
                                  "network": {"rank": 16, "alpha": 16, "targets": "transformer",
                                              "algorithm": algorithm, **ALGORITHMS[algorithm]},
                                  "optimizer": {"learning_rate": 1e-4, "scheduler": "cosine", "warmup_steps": 2}})


def step_seconds(stamps: list[float]) -> float:
    """The median interval between consecutive steps after the warmup: on a CPU shared with other work, one step
    slowed by a neighbour moves a mean but not the median."""
    return statistics.median(b - a for a, b in zip(stamps[WARMUP - 1:], stamps[WARMUP:]))


def time_ours(host, latents, dataset_cfg, tmp: Path, round_index: int, algorithm: str = "lora") -> float:
    from trainer.monitor.events import ProgressReporter
    from trainer.monitor.runlog import RunLog
    from trainer.training.loop import Hooks, train

    stamps = []
    run_dir = tmp / f"run{round_index}_{algorithm}"
    reporter = ProgressReporter(lambda payload: None, node="bench", run=run_dir.name, total=STEPS)
    with RunLog(run_dir) as runlog:
        train(host, latents, config(algorithm), run_dir, dataset_cfg=dataset_cfg, text_cache_dir=tmp / "text",
              reporter=reporter, runlog=runlog, hooks=Hooks(on_step=lambda *_: stamps.append(time.perf_counter())))
    return step_seconds(stamps)


def time_floor(host, latents) -> float:
    import torch

    from trainer.adapters.network import LoRANetwork

    cfg = config()
    network = LoRANetwork(host.adapter_targets("transformer", False, False), cfg.network,
                          generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4, fused=True)
    sample = latents.samples[0]
    x = torch.randn(BATCH, *sample.latent.shape)
    context = torch.randn(BATCH, 77, host.context_width)
    t = torch.randint(0, 1000, (BATCH,))
    target = torch.randn_like(x)
    stamps = []
    with network.attached(), torch.enable_grad():
        for _ in range(STEPS):
            out = host.unet(x, t, encoder_hidden_states=context).sample
            torch.nn.functional.mse_loss(out, target).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stamps.append(time.perf_counter())
    return step_seconds(stamps)


def main() -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        host, latents, dataset_cfg = build(tmp)
        params = sum(p.numel() for p in host.unet.parameters())
        print(f"UNet {params / 1e6:.1f} M params, latents {tuple(latents.samples[0].latent.shape)}, batch {BATCH}, "
              f"{torch.get_num_threads()} threads, {STEPS - WARMUP} timed steps x {ROUNDS} rounds")
        runs: dict[str, list[float]] = {a: [] for a in ALGORITHMS}
        floor = []
        for r in range(ROUNDS):
            floor.append(time_floor(host, latents))
            for algorithm in ALGORITHMS:
                runs[algorithm].append(time_ours(host, latents, dataset_cfg, tmp, r, algorithm))
            rows = ", ".join(f"{a} {runs[a][-1] * 1000:.1f}" for a in ALGORITHMS)
            print(f"round {r + 1}: floor {floor[-1] * 1000:.1f} ms/step, ours: {rows} ms/step")
    floor_s = statistics.median(floor)
    median = {a: statistics.median(runs[a]) for a in ALGORITHMS}
    ours_s = median["lora"]
    print(f"median: floor {floor_s * 1000:.1f} ms/step, ours {ours_s * 1000:.1f} ms/step")
    print("algorithm  ms/step  over floor  over LoRA (rank 16, transformer targets)")
    for a in ALGORITHMS:
        print(f"{a:9s} {median[a] * 1000:8.1f} {median[a] / floor_s:11.3f} {median[a] / ours_s:10.3f}")
    for a in list(ALGORITHMS)[1:]:
        print(f"{a}_over_lora: {median[a] / ours_s:.3f}")
    print(f"step_over_floor: {ours_s / floor_s:.3f}")


if __name__ == "__main__":
    main()
