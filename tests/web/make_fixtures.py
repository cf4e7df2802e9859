"""Regenerate the web test fixtures from the real engine code (run from the repository root):

    python tests/web/make_fixtures.py

* fixtures/events.json: a recorded `loralab.progress` stream of node "5" from trainer.monitor.events.ProgressReporter with a
  fake clock (5 it/s) and CUDA-like memory: caching -> encoding -> training -> preview (3 s) -> training -> saving ->
  training -> preview -> done; previews every 125 steps and saves every 200, so the ETA includes them.
* fixtures/history_run.json: what GET /loralab/runs/<run>/history returns for a finished earlier run (built with
  RunLog + read_history + latest.json), used by the harness to test "reload redraws the whole curve".
* fixtures/preview.png: a small preview image.
"""
from __future__ import annotations

import json
import math
import random
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from trainer.monitor.events import ProgressReporter, preview_url  # noqa: E402
from trainer.monitor.runlog import ESTIMATE_FILE, RunLog, read_estimate, read_history, read_latest  # noqa: E402

ESTIMATE_TEXT = """Memory estimate (cpu): 4.0 GiB of 30.1 GiB available -> FITS (headroom 25.7 GiB)
  for 512x512 px, batch 1, rank 16, adamw, mixed precision no, checkpointing off
  model weights          3.20 GiB
  activations             612 MiB
To use less memory:
  - turn on gradient_checkpointing (about 20-40 % slower steps): saves 410 MiB -> 3.6 GiB (fits)
"""

GiB = 1 << 30
RUN = "lora_demo_20260101-120000"
PREV_RUN = "lora_prev_20251231-090000"


def loss_at(step: int, rng: random.Random) -> float:
    return 0.06 + 0.11 * math.exp(-step / 90) + abs(rng.gauss(0, 0.035)) * (3.5 if step % 97 == 0 else 1)


def record_events() -> list[dict]:
    rng = random.Random(7)
    t = [0.0]
    events: list[dict] = []
    total = 300
    mem = {"device": "cuda:0", "allocated": int(5.1 * GiB), "reserved": int(6.0 * GiB), "peak": int(5.1 * GiB),
           "total": 24 * GiB}

    def snap():
        return dict(mem)

    # previews every 125 steps, a resumable state every 200: the ETA counts them (eta_detail)
    rep = ProgressReporter(events.append, node="5", run=RUN, total=total, clock=lambda: t[0], memory=snap,
                           preview_every=125, save_every=200)
    for i in range(0, 41, 2):
        rep.phase("caching", message=f"caching latents {i}/40")
        t[0] += 0.1
    rep.estimate = int(11.0 * GiB)  # Train LoRA's pre-flight estimate of the peak (mem.estimate from here on)
    rep.phase("encoding", message="encoding 12 captions")
    t[0] += 0.5
    lr = 1e-4
    for step in range(1, total + 1):
        t[0] += 0.2 + rng.random() * 0.02
        mem["allocated"] = int((7.2 + 0.3 * math.sin(step / 9)) * GiB)
        mem["reserved"] = int(9.0 * GiB)
        mem["peak"] = max(mem["peak"], int((10.2 + 0.2 * math.sin(step / 13)) * GiB))
        cur_lr = lr * min(1.0, step / 20) * (0.5 * (1 + math.cos(math.pi * step / total)))
        rep.step(step, loss_at(step, rng), cur_lr)
        if step % 125 == 0:
            rep.phase("preview", message="sampling 2 prompts")
            t[0] += 3.0
            rep.preview(step, preview_url(RUN, f"step_{step:06d}.png"))
        if step == 200:
            rep.phase("saving", message="saving state step_200")
            t[0] += 1.0
    rep.phase("saving", message="saving LoRA")
    t[0] += 0.5
    rep.done(f"saved loras/{RUN}.safetensors")
    return events


def previous_run() -> dict:
    rng = random.Random(3)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / PREV_RUN
        clock = [1767171600.0]
        with RunLog(d, wallclock=lambda: clock[0]) as log:
            for step in range(1, 121):
                clock[0] += 1.7
                log.log_step(step, loss_at(step, rng) * 1.3, 2e-4)
                if step == 60:
                    log.mark(step, "preview", "step_000060.png")
                if step == 100:
                    log.mark(step, "save", "state/step_100")
            log.mark(120, "preview", "step_000120.png")
            log.write_latest({
                "v": 1, "node": "9", "run": PREV_RUN, "phase": "done", "step": 120, "total": 120, "loss": 0.081,
                "loss_ema": 0.094, "lr": 2e-4, "it_per_s": 0.59, "eta_s": 0.0,
                "mem": {"device": "cpu", "allocated": int(3.4 * GiB), "reserved": int(3.4 * GiB),
                        "peak": int(4.1 * GiB), "total": 32 * GiB},
                "message": f"saved loras/{PREV_RUN}.safetensors",
            }, force=True)
        (d / ESTIMATE_FILE).write_text(ESTIMATE_TEXT, encoding="utf-8")
        return {"run": PREV_RUN, "history": read_history(d), "latest": read_latest(d), "estimate": read_estimate(d)}


def preview_png(path: Path) -> None:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 96))
    px = img.load()
    for y in range(96):
        for x in range(96):
            px[x, y] = (80 + x, 60 + y, 160 + (x * y) % 90)
    d = ImageDraw.Draw(img)
    d.ellipse([28, 20, 68, 60], fill=(245, 210, 170))
    d.rectangle([22, 58, 74, 96], fill=(60, 90, 150))
    img.save(path, format="PNG", optimize=True)


def main() -> None:
    out = HERE / "fixtures"
    out.mkdir(exist_ok=True)
    events = record_events()
    (out / "events.json").write_text(json.dumps({"run": RUN, "node": "5", "events": events}, separators=(",", ":")))
    (out / "history_run.json").write_text(json.dumps(previous_run(), separators=(",", ":")))
    preview_png(out / "preview.png")
    print(f"{len(events)} events; fixtures in {out}")


if __name__ == "__main__":
    main()
