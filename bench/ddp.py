"""Data-parallel scaling on the CPU: the demo model trained by 1 process and by 2 processes under torchrun.

Both runs are the real CLI (`python -m trainer train --config demo_config.json`, the second under
`torchrun --standalone --nproc_per_node 2`), one CPU thread per process, the same per-process batch (2), so two
processes train twice the samples per step (gloo all-reduce of the adapter gradients and the loss every step).
Speed is read from the run log's per-step wall-clock times after a warm-up, so start-up (imports, model load,
caching, the memory estimate) is not counted. Each configuration runs ROUNDS times, alternating; the best is kept.

    python bench/ddp.py        # last line: ddp_scaling: <2-process samples/s / 1-process samples/s>  (goal >= 1.7)

The line before it measures the machine's own ceiling (two independent one-thread processes vs one).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS, WARMUP, ROUNDS, BATCH = 120, 20, 2, 2


def env() -> dict:
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    out = {k: v for k, v in os.environ.items() if k not in launcher}
    out.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return out


def config(demo: Path, name: str) -> Path:
    data = json.loads((demo / "demo_config.json").read_text())
    data["train"].update(steps=STEPS, batch_size=BATCH, save_every=0)
    data["output"] = {"run_dir": str(demo / "runs" / name), "lora": str(demo / f"{name}.safetensors"),
                      "cache_dir": str(demo / "cache")}
    path = demo / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def samples_per_second(demo: Path, processes: int, round_index: int) -> tuple[float, float]:
    """(samples/s, seconds per step) of one run, measured over the steps after WARMUP."""
    name = f"p{processes}_r{round_index}"
    train = ["-m", "trainer", "train", "--config", str(config(demo, name))]
    command = [sys.executable, *train] if processes == 1 else \
        [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(processes), *train]
    done = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    times = {}
    for line in (demo / "runs" / name / "history.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "loss" in entry:
            times[entry["step"]] = entry["time"]
    seconds_per_step = (times[STEPS] - times[WARMUP]) / (STEPS - WARMUP)
    return BATCH * processes / seconds_per_step, seconds_per_step


CEILING_SCRIPT = """
import time, torch
torch.set_num_threads(1)
a, b = torch.randn(256, 256), torch.randn(256, 256)
t = time.perf_counter()
for _ in range(3000):
    a @ b
print(time.perf_counter() - t)
"""


def machine_ceiling() -> float:
    """The floor of this comparison: how much faster two independent one-thread processes compute than one on this
    machine (2.0 on two free physical cores; less with shared or busy cores). DDP cannot scale past it."""
    one = float(subprocess.run([sys.executable, "-c", CEILING_SCRIPT], env=env(), capture_output=True, text=True,
                               check=True).stdout)
    pair = [subprocess.Popen([sys.executable, "-c", CEILING_SCRIPT], env=env(), stdout=subprocess.PIPE, text=True)
            for _ in range(2)]
    both = max(float(p.communicate()[0]) for p in pair)
    return 2 * one / both


def main() -> None:
    from trainer.demo import prepare_demo

    print(f"{os.cpu_count()} CPU cores, load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        demo = prepare_demo(Path(tmp) / "demo", echo=lambda *a: None)[1].parent
        best = {1: (0.0, 0.0), 2: (0.0, 0.0)}
        for round_index in range(ROUNDS):
            for processes in (1, 2):
                rate, per_step = samples_per_second(demo, processes, round_index)
                print(f"  round {round_index + 1}: {processes} process(es) x batch {BATCH}: {rate:6.1f} samples/s "
                      f"({per_step * 1000:.1f} ms/step)")
                best[processes] = max(best[processes], (rate, per_step))
    for processes, (rate, per_step) in best.items():
        print(f"{processes} process(es) x batch {BATCH} (global batch {BATCH * processes}), one thread each: "
              f"{rate:.1f} samples/s ({per_step * 1000:.1f} ms/step), best of {ROUNDS}")
    print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    ceiling = machine_ceiling()
    print(f"machine ceiling (2 independent one-thread matmul processes vs 1): {ceiling:.3f}; "
          f"ddp_scaling / ceiling: {best[2][0] / best[1][0] / ceiling:.3f}")
    print(f"ddp_scaling: {best[2][0] / best[1][0]:.3f}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
