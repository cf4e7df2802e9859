"""The Run orchestrator on a tiny real model: one identity for "find my run" and "may I resume", reuse of finished
runs, more steps continue a run (on the longer LR schedule), fewer are refused, EMA files, changed data is reported."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from shapes import write_shape_dataset

from trainer.config import BucketConfig, TrainConfig
from trainer.errors import TrainingError
from trainer.hosts.diffusers_host import DiffusersHost
from trainer.run import FINAL_EMA_LORA, FINAL_LORA, Run
from trainer.training import loop
from trainer.training.identity import RunIdentity
from trainer.training.optim import lr_multiplier


def config(**overrides) -> TrainConfig:
    data = {"steps": 6, "batch_size": 2, "seed": 0, "save_every": 0, "network": {"rank": 4, "alpha": 4},
            "optimizer": {"learning_rate": 1e-3, "scheduler": "cosine", "warmup_steps": 0}}
    data.update(overrides)
    return TrainConfig.from_dict(data)


@pytest.fixture
def setup(tiny_models, make_latents, tmp_path):
    host = DiffusersHost(tiny_models("sd15"))
    latents, dataset_cfg = make_latents(host, write_shape_dataset(tmp_path / "data", 4))

    def run(cfg, run_dir=None, **kwargs):
        return Run(host, latents, cfg, run_dir=run_dir or tmp_path / "run", dataset_cfg=dataset_cfg,
                   bucket_cfg=BucketConfig(resolutions=[64], min_bucket=32, max_bucket=128, step=32),
                   cache_dir=tmp_path / "cache", image_count=4, **kwargs).execute()

    return host, latents, dataset_cfg, run


def count_training(monkeypatch) -> list:
    calls = []
    real = loop.train

    def spy(*args, **kwargs):
        calls.append(kwargs.get("resume"))
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train", spy)
    return calls


def test_settings_that_do_not_change_the_result_keep_the_run_identity(setup):
    host, latents, dataset_cfg, _ = setup
    base = config()
    key = RunIdentity.of(host, base, latents.samples, dataset_cfg).key
    neutral = dataclasses.replace(base, steps=99, save_every=5, keep_last=1, output_dtype="bf16",
                                  gradient_checkpointing=True)
    assert RunIdentity.of(host, neutral, latents.samples, dataset_cfg).key == key
    for changed in (dataclasses.replace(base, seed=1), dataclasses.replace(base, batch_size=1),
                    config(optimizer={"learning_rate": 2e-3, "scheduler": "cosine"}), config(mixed_precision="bf16")):
        assert RunIdentity.of(host, changed, latents.samples, dataset_cfg).key != key
    other_data = dataclasses.replace(dataset_cfg, trigger_word="zzz")
    ident = RunIdentity.of(host, base, latents.samples, other_data)
    assert ident.key != key and ident.differences(RunIdentity.of(host, base, latents.samples, dataset_cfg)) == ["data"]


def test_a_finished_run_is_reused_and_neutral_changes_never_retrain(setup, monkeypatch):
    _, _, _, run = setup
    calls = count_training(monkeypatch)
    first = run(config(ema_decay=0.9))
    assert first.outcome == "trained" and first.step == 6 and calls == [False]
    assert (first.run_dir / FINAL_LORA).is_file() and (first.run_dir / FINAL_EMA_LORA).is_file()
    again = run(config(ema_decay=0.9, save_every=2, keep_last=1, output_dtype="bf16", gradient_checkpointing=True))
    assert again.outcome == "reused" and calls == [False]  # no training at all
    assert again.lora.keys() == first.lora.keys() and all(torch.equal(again.lora[k], first.lora[k]) for k in first.lora)
    assert again.ema is not None and all(torch.equal(again.ema[k], first.ema[k]) for k in first.ema)
    assert not all(torch.equal(first.ema[k], first.lora[k]) for k in first.lora)  # EMA is its own set of weights
    assert again.losses == first.losses and "reused the finished run: 6 steps" in again.summary()


def test_more_steps_continue_a_finished_run_on_the_longer_schedule(setup, monkeypatch):
    _, _, _, run = setup
    first = run(config(steps=4))
    calls = count_training(monkeypatch)
    longer = run(config(steps=8))
    assert longer.outcome == "resumed" and calls == [True] and longer.step == 8
    assert longer.losses[:4] == first.losses and len(longer.losses) == 8
    history = [json.loads(line) for line in (longer.run_dir / "history.jsonl").read_text().splitlines()]
    lrs = {h["step"]: h["lr"] for h in history if "lr" in h}
    # steps 1-4 followed the 4-step cosine; from step 5 on, the LR is the 8-step cosine's at that step
    assert lrs[4] == pytest.approx(1e-3 * lr_multiplier(3, "cosine", 4, 0))
    for step in range(5, 9):
        assert lrs[step] == pytest.approx(1e-3 * lr_multiplier(step - 1, "cosine", 8, 0))
    assert "resumed and finished: 8 steps" in longer.summary()


def test_fewer_steps_than_the_run_has_are_refused_with_the_way_out(setup):
    _, _, _, run = setup
    run(config(steps=4))
    with pytest.raises(TrainingError, match=r"already trained 4 steps.*steps = 2.*change the run name"):
        run(config(steps=2))


def test_resuming_onto_changed_data_says_so(setup, make_latents, tmp_path):
    host, _, _, _ = setup
    stopped = tmp_path / "stopped"
    latents, dataset_cfg = make_latents(host, write_shape_dataset(tmp_path / "data", 4))
    bucket_cfg = BucketConfig(resolutions=[64], min_bucket=32, max_bucket=128, step=32)

    class StopAt3:
        calls = 0

        def __call__(self):
            self.calls += 1
            if self.calls > 3:
                from trainer.errors import TrainingInterrupted

                raise TrainingInterrupted()

    host._interrupt = StopAt3()
    from trainer.errors import TrainingInterrupted

    with pytest.raises(TrainingInterrupted):
        Run(host, latents, config(), run_dir=stopped, dataset_cfg=dataset_cfg, bucket_cfg=bucket_cfg,
            cache_dir=tmp_path / "cache", image_count=4).execute()
    host._interrupt = None
    grown, grown_cfg = make_latents(host, write_shape_dataset(tmp_path / "data2", 6, seed=5))
    result = Run(host, grown, config(), run_dir=stopped, dataset_cfg=grown_cfg, bucket_cfg=bucket_cfg,
                 cache_dir=tmp_path / "cache", image_count=6).execute()
    assert result.outcome == "resumed" and result.step == 6
    assert "note: resuming onto a changed dataset" in result.summary()


def test_a_resume_with_other_settings_is_refused(setup):
    _, _, _, run = setup
    with pytest.raises(TrainingError, match="nothing to resume"):
        run(config(), resume="required")
    run(config(steps=2))
    with pytest.raises(TrainingError, match="different training settings"):
        run(config(steps=4, optimizer={"learning_rate": 5e-4, "scheduler": "cosine"}))


def test_the_summary_names_prediction_and_precision(tiny_models, make_latents, tmp_path):
    host = DiffusersHost(tiny_models("sd15", "v_prediction"))
    latents, dataset_cfg = make_latents(host, write_shape_dataset(tmp_path / "data", 2))
    result = Run(host, latents, config(steps=1), run_dir=tmp_path / "run", dataset_cfg=dataset_cfg,
                 bucket_cfg=BucketConfig(resolutions=[64], min_bucket=32, max_bucket=128, step=32),
                 cache_dir=tmp_path / "cache", image_count=2).execute()
    text = result.summary()
    assert "prediction: v (1000-step discrete schedule)" in text
    assert "precision: fp32 (the weights are fp32)" in text
