"""Pre-flight checks: each one is triggered and its message names the setting and the fix."""
from __future__ import annotations

import dataclasses
import math

import pytest
from PIL import Image

from trainer.config import BucketConfig, DatasetConfig, TrainConfig
from trainer.errors import TrainingError
from trainer.preflight.checks import Problem, preflight, raise_problems


@pytest.fixture(scope="module")
def host(tiny_models):
    from trainer.hosts.diffusers_host import DiffusersHost

    return DiffusersHost(tiny_models("sd15"))


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "a.png")
    (folder / "a.txt").write_text("a red square")
    return DatasetConfig(folder=str(folder))


def cfg_with(**changes) -> TrainConfig:
    network = changes.pop("network", {})
    optimizer = changes.pop("optimizer", {})
    objective = changes.pop("objective", {})
    cfg = dataclasses.replace(TrainConfig(steps=10, network=dataclasses.replace(TrainConfig().network, rank=4)),
                              **changes)
    cfg.network = dataclasses.replace(cfg.network, **network)
    cfg.optimizer = dataclasses.replace(cfg.optimizer, **optimizer)
    cfg.objective = dataclasses.replace(cfg.objective, **objective)
    return cfg


def run(host, tmp_path, dataset=None, cfg=None, buckets=None, **kw):
    kw.setdefault("latent_channels_from_vae", 4)
    kw.setdefault("output_dir", tmp_path / "out")
    kw.setdefault("cache_dir", tmp_path / "cache")
    return preflight(host, cfg or cfg_with(), dataset, buckets or BucketConfig(resolutions=[512]), **kw)


def only(problems, setting: str) -> Problem:
    found = [p for p in problems if p.setting == setting]
    assert len(found) == 1, (setting, [str(p) for p in problems])
    return found[0]


def test_good_settings_pass(host, tmp_path, dataset):
    assert run(host, tmp_path, dataset) == []
    assert raise_problems([]) == []


@pytest.mark.parametrize("changes, setting, bad", [
    ({"optimizer": {"name": "adam"}}, "optimizer.name", "adamw8bit"),
    ({"optimizer": {"scheduler": "cosin"}}, "optimizer.scheduler", "cosine_with_restarts"),
    ({"objective": {"loss": "mae"}}, "objective.loss", "huber"),
    ({"objective": {"timestep_sampling": "sigmoid"}}, "objective.timestep_sampling", "logit_normal"),
    ({"mixed_precision": "fp8"}, "mixed_precision", "bf16"),
    ({"network": {"targets": "everything"}}, "network.targets", "transformer"),
    ({"output_dtype": "int8"}, "output_dtype", "fp16"),
])
def test_unknown_names_list_the_choices(host, tmp_path, changes, setting, bad):
    p = only(run(host, tmp_path, cfg=cfg_with(**changes)), setting)
    assert "not a known choice" in p.message and bad in p.fix and "choose one of" in p.fix


def test_unknown_bucket_crop(host, tmp_path):
    p = only(run(host, tmp_path, buckets=BucketConfig(resolutions=[512], crop="middle")), "buckets.crop")
    assert "center, random" in p.fix


@pytest.mark.parametrize("changes, setting", [
    ({"steps": 0}, "steps"), ({"batch_size": -1}, "batch_size"),
    ({"optimizer": {"grad_accumulation": 0}}, "optimizer.grad_accumulation"),
])
def test_counts_must_be_positive(host, tmp_path, changes, setting):
    p = only(run(host, tmp_path, cfg=cfg_with(**changes)), setting)
    assert "whole number >= 1" in p.message and "1" in p.fix


@pytest.mark.parametrize("lr", [0.0, -1e-4, math.nan, math.inf])
def test_learning_rate_must_be_finite_and_positive(host, tmp_path, lr):
    p = only(run(host, tmp_path, cfg=cfg_with(optimizer={"learning_rate": lr})), "optimizer.learning_rate")
    assert "finite number > 0" in p.message and "1e-4" in p.fix


def test_lora_to_continue_from_must_exist(host, tmp_path):
    missing = tmp_path / "nope.safetensors"
    p = only(run(host, tmp_path, cfg=cfg_with(network={"init_from": str(missing)})), "network.init_from")
    assert str(missing) in p.message and "continue_from" in p.fix
    missing.write_bytes(b"x")  # existence is what is checked here; the loader reports a broken file
    assert run(host, tmp_path, cfg=cfg_with(network={"init_from": str(missing)})) == []


def test_text_encoder_lr(host, tmp_path):
    p = only(run(host, tmp_path, cfg=cfg_with(optimizer={"text_encoder_lr": 0.0})), "optimizer.text_encoder_lr")
    assert "> 0" in p.message and "learning_rate" in p.fix
    assert run(host, tmp_path, cfg=cfg_with(optimizer={"text_encoder_lr": None})) == []


def test_fp16_on_the_cpu(host, tmp_path):
    p = only(run(host, tmp_path, cfg=cfg_with(mixed_precision="fp16")), "mixed_precision")
    assert "CPU" in p.message and "bf16" in p.fix


def test_resolution_not_a_multiple_of_the_step(host, tmp_path):
    p = only(run(host, tmp_path, buckets=BucketConfig(resolutions=[500], step=64, min_bucket=256)),
             "buckets.resolutions")
    assert "500 is not a multiple of buckets.step 64" in p.message and "448 or 512" in p.fix
    p = only(run(host, tmp_path, buckets=BucketConfig(resolutions=[512], step=60)), "buckets.step")
    assert "multiple of 8" in p.message and "64" in p.fix


def test_min_and_max_bucket_against_the_resolution(host, tmp_path):
    p = only(run(host, tmp_path, buckets=BucketConfig(resolutions=[512], min_bucket=640, max_bucket=1024)),
             "buckets.min_bucket")
    assert "larger than the resolution 512" in p.message and "at most 512" in p.fix
    p = only(run(host, tmp_path, buckets=BucketConfig(resolutions=[512], min_bucket=256, max_bucket=448)),
             "buckets.max_bucket")
    assert "smaller than the resolution 512" in p.message and "at least 512" in p.fix
    problems = run(host, tmp_path, buckets=BucketConfig(resolutions=[512], min_bucket=1024, max_bucket=768))
    assert any("larger than buckets.max_bucket" in p.message and "swap" in p.fix for p in problems)


def test_vae_latent_channels(host, tmp_path):
    p = only(run(host, tmp_path, latent_channels_from_vae=16), "VAE")
    assert "16-channel" in p.message and "4-channel" in p.message and "VAE that belongs" in p.fix


def test_clip_width(host, tmp_path, monkeypatch):
    monkeypatch.setattr(host, "context_width", 768)
    p = only(run(host, tmp_path), "CLIP")
    assert "32-wide" in p.message and "768-wide" in p.message and "same Load Checkpoint" in p.fix


def test_rank_larger_than_a_layer(host, tmp_path):
    p = only(run(host, tmp_path, cfg=cfg_with(network={"rank": 48})), "network.rank")
    assert "48 is larger than" in p.message and "lora_unet_" in p.message and "(in 32, out" in p.message
    assert "lower network.rank to 32" in p.fix
    p = only(run(host, tmp_path, cfg=cfg_with(network={"rank": 4, "conv_rank": 400, "targets": "full"})),
             "network.conv_rank")
    assert "400 is larger than" in p.message and "network.conv_rank" in p.fix


def test_dataset_folder_missing_or_empty(host, tmp_path):
    p = only(run(host, tmp_path, DatasetConfig(folder=str(tmp_path / "nope"))), "dataset.folder")
    assert "nope" in p.message and "dataset.folder" in p.fix
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    p = only(run(host, tmp_path, DatasetConfig(folder=str(empty))), "dataset.folder")
    assert "no images" in p.message and ".png" in p.message and "put the training images" in p.fix
    p = only(run(host, tmp_path, DatasetConfig(folder="")), "dataset.folder")
    assert "folder" in p.message.lower()


def test_output_folder_not_writable(host, tmp_path, dataset):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    p = only(run(host, tmp_path, dataset, output_dir=blocker / "out"), "output folder")
    assert "cannot write" in p.message and str(blocker) in p.message and "choose a folder" in p.fix
    p = only(run(host, tmp_path, dataset, cache_dir=blocker / "cache"), "cache folder")
    assert "cannot write" in p.message


def test_not_enough_disk(host, tmp_path, dataset):
    problems = run(host, tmp_path, dataset, expected_output_bytes=10 ** 18)
    p = [p for p in problems if "free" in p.message]
    assert len(p) == 1 and "output folder" in p[0].setting and "free disk space" in p[0].fix


def test_default_output_size_is_estimated(host):
    from trainer.preflight.checks import output_bytes

    small = output_bytes(host, cfg_with(network={"rank": 4}))
    big = output_bytes(host, cfg_with(network={"rank": 8}, save_every=2, keep_last=3))
    assert 0 < small["LoRA files"] < big["LoRA files"] and big["resume snapshots"] > 2 * small["resume snapshots"]


def _identity(cfg, model="the-model", data="the-data"):
    from trainer.training.identity import RunIdentity, settings_digest

    return RunIdentity(model, settings_digest(cfg), data)


def _snapshot(run_dir, host, identity):
    import torch

    from trainer.training.state import save_snapshot

    meta = {"identity": identity.to_dict(), "family": host.family}
    save_snapshot(run_dir, 5, {"x.alpha": torch.tensor(1.0)}, {"losses": []}, meta)


def test_resume_folder_checks(host, tmp_path, dataset):
    """The resume folder must exist and hold a snapshot of the same model and settings; settings that do not change
    the result (steps, saving, checkpointing) may differ; changed data is a warning, not an error."""
    cfg = cfg_with()
    run_dir = tmp_path / "run"
    p = only(run(host, tmp_path, dataset, cfg=cfg, resume_dir=run_dir, identity=_identity(cfg)), "resume_from")
    assert "does not exist" in p.message
    run_dir.mkdir()
    p = only(run(host, tmp_path, dataset, cfg=cfg, resume_dir=run_dir, identity=_identity(cfg)), "resume_from")
    assert p.level == "warning" and "no saved state" in p.message
    _snapshot(run_dir, host, _identity(cfg))
    assert run(host, tmp_path, dataset, cfg=cfg, resume_dir=run_dir, identity=_identity(cfg)) == []
    neutral = dataclasses.replace(cfg, save_every=5, steps=999, keep_last=1, gradient_checkpointing=True)
    assert run(host, tmp_path, dataset, cfg=neutral, resume_dir=run_dir, identity=_identity(neutral)) == []
    other = cfg_with(network={"rank": 8})
    p = only(run(host, tmp_path, dataset, cfg=other, resume_dir=run_dir, identity=_identity(other)), "resume_from")
    assert "different training settings" in p.message and "config.json" in p.fix
    p = only(run(host, tmp_path, dataset, cfg=cfg, resume_dir=run_dir, identity=_identity(cfg, model="other")),
             "resume_from")
    assert "different model" in p.message and "same model" in p.fix
    p = only(run(host, tmp_path, dataset, cfg=cfg, resume_dir=run_dir, identity=_identity(cfg, data="new")),
             "resume_from")
    assert p.level == "warning" and "changed dataset" in p.message


def test_all_problems_in_one_error(host, tmp_path):
    problems = run(host, tmp_path, DatasetConfig(folder=str(tmp_path / "missing")),
                   cfg=cfg_with(steps=0, optimizer={"learning_rate": 0.0, "name": "adam"}),
                   latent_channels_from_vae=16)
    assert len(problems) >= 5
    with pytest.raises(TrainingError) as err:
        raise_problems(problems)
    text = str(err.value)
    assert text.startswith(f"Training cannot start: {len(problems)} problems")
    for setting in ("steps", "optimizer.learning_rate", "optimizer.name", "VAE", "dataset.folder"):
        assert f". {setting}: " in text
    assert err.value.problems == problems
    warning = Problem("resume_from", "nothing to resume", "a new run starts", level="warning")
    assert raise_problems([warning]) == [warning]
