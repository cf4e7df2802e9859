"""A real run's ETA counts the previews and saves still to come, at the measured cost of the last one: the Run hands
the loop's cadences to the reporter, and the preview's own duration (not the steps') is what is measured."""
from __future__ import annotations

import time

from shapes import write_shape_dataset

from trainer.config import BucketConfig, TrainConfig
from trainer.hosts.diffusers_host import DiffusersHost
from trainer.run import Run
from trainer.training.loop import Hooks

PREVIEW_SECONDS = 0.6  # each preview "renders" this long: far longer than a tiny CPU step


def test_a_runs_eta_includes_the_previews_left_at_the_last_previews_cost(tiny_models, make_latents, tmp_path):
    host = DiffusersHost(tiny_models("sd15"))
    latents, dataset_cfg = make_latents(host, write_shape_dataset(tmp_path / "data", 2))
    cfg = TrainConfig.from_dict({"steps": 8, "batch_size": 1, "save_every": 4, "network": {"rank": 2, "alpha": 2}})
    rendered = []

    def preview(step, network):
        time.sleep(PREVIEW_SECONDS)
        path = tmp_path / "run" / "previews" / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"png")
        rendered.append(step)
        return str(path)

    events: list[dict] = []
    Run(host, latents, cfg, run_dir=tmp_path / "run", dataset_cfg=dataset_cfg,
        bucket_cfg=BucketConfig(resolutions=[64], min_bucket=32, max_bucket=128, step=32), cache_dir=tmp_path / "c",
        image_count=2, emit=events.append, min_interval=0.0, hooks=Hooks(preview=preview, preview_every=2)).execute()
    assert rendered == [2, 4, 6, 8]

    def first(phase, step):
        return next(e for e in events if e["phase"] == phase and e["step"] == step)

    # before any preview ran, its cost is unknown: the ETA is the steps' time only, and says 4 previews are to come
    start = first("training", 1)["eta_detail"]
    assert start["previews_left"] == 4 and start["preview_cost_s"] is None and start["saves_left"] == 1
    # after the first preview, each one left is counted at its measured cost (the sleep, not the steps)
    after = first("training", 3)
    detail = after["eta_detail"]
    assert detail["previews_left"] == 3  # 4, 6 and 8
    assert PREVIEW_SECONDS <= detail["preview_cost_s"] < PREVIEW_SECONDS + 0.5
    assert after["eta_s"] >= detail["training_s"] + 3 * PREVIEW_SECONDS
    # the save at step 4 is measured too, and nothing is left at the end
    assert first("training", 5)["eta_detail"]["save_cost_s"] is not None
    assert events[-1]["phase"] == "done" and events[-1]["eta_s"] == 0.0
