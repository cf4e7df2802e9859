"""Settings that are valid but defeat themselves get a warning (training goes on), and every piece of advice names
the setting in the front-end's words: the config key headless, the node's widget inside ComfyUI."""
from __future__ import annotations

import dataclasses

import pytest
from shapes import write_shape_dataset

from trainer.config import BucketConfig, TrainConfig
from trainer.preflight.checks import preflight, raise_problems
from trainer.preflight.naming import CONFIG_KEYS, Naming, setting_ref

# The ComfyUI words as nodes/widget_names.py builds them (that module is ComfyUI-facing; its table is checked
# against the real node schemas in tests/comfy/test_widget_names.py).
COMFY = Naming({"optimizer.warmup_steps": "Configure LoRA's warmup_steps", "steps": "Train LoRA's steps",
                "optimizer.learning_rate": "Configure LoRA's learning_rate", "save_every": "Train LoRA's save_every",
                "preview_every": "Train LoRA's preview_every", "optimizer.name": "Configure LoRA's optimizer",
                "buckets.resolutions": "Bucket & Cache Latents' resolution", "network.rank": "Configure LoRA's rank",
                "batch_size": "Train LoRA's batch_size", "gradient_checkpointing": "Configure LoRA's "
                "gradient_checkpointing", "optimizer.grad_accumulation": "Configure LoRA's grad_accumulation"})


@pytest.fixture(scope="module")
def host(tiny_models):
    from trainer.hosts.diffusers_host import DiffusersHost

    return DiffusersHost(tiny_models("sd15"))  # family "sd15": trained at 512 px


def cfg_with(steps=30, **changes) -> TrainConfig:
    optimizer = changes.pop("optimizer", {})
    cfg = dataclasses.replace(TrainConfig(steps=steps, network=dataclasses.replace(TrainConfig().network, rank=4)),
                              **changes)
    cfg.optimizer = dataclasses.replace(cfg.optimizer, **optimizer)
    return cfg


def warnings(host, tmp_path, cfg, resolution=512, **kw):
    problems = preflight(host, cfg, None, BucketConfig(resolutions=[resolution]), latent_channels_from_vae=4,
                         output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", **kw)
    assert all(p.level == "warning" for p in problems), [str(p) for p in problems]
    assert raise_problems(problems) == problems  # warnings never stop training
    return {p.setting: p for p in problems}


def test_sane_settings_warn_about_nothing(host, tmp_path):
    assert warnings(host, tmp_path, cfg_with(save_every=10, optimizer={"warmup_steps": 3}), preview_every=10) == {}
    assert warnings(host, tmp_path, cfg_with(), resolution=768) == {}  # 1.5x native is still fine


@pytest.mark.parametrize("warmup, says", [(50, "never reaches"), (30, "reaches only at the last step")])
def test_a_warmup_as_long_as_the_run(host, tmp_path, warmup, says):
    p = warnings(host, tmp_path, cfg_with(optimizer={"warmup_steps": warmup}))["optimizer.warmup_steps"]
    headless = p.render(CONFIG_KEYS)
    assert headless == str(p)
    assert headless.startswith(f"optimizer.warmup_steps: {warmup} is not below steps 30: the learning rate ramps up")
    assert says in headless and "optimizer.learning_rate 0.0001" in headless
    assert "Fix: set optimizer.warmup_steps to about 5-10 % of the steps (3 here), or 0" in headless
    in_node = p.render(COMFY)
    assert in_node.startswith(f"Configure LoRA's warmup_steps: {warmup} is not below Train LoRA's steps 30")
    assert "Fix: set Configure LoRA's warmup_steps to about" in in_node and "{" not in in_node


def test_save_and_preview_intervals_longer_than_the_run(host, tmp_path):
    found = warnings(host, tmp_path, cfg_with(save_every=250), preview_every=100)
    save, preview = found["save_every"], found["preview_every"]
    assert "250 is more than steps 30: no resumable state is saved during the run" in str(save)
    assert "Fix: set save_every to 7 (a quarter of the run)" in str(save)
    assert "or 0 to save only at the end" in str(save)
    assert "100 is more than steps 30: no preview is rendered in this run" in str(preview)
    assert preview.render(COMFY).startswith("Train LoRA's preview_every: 100 is more than Train LoRA's steps 30")
    # the last step still previews and periodic saves need save_every < steps: equal is not "longer"
    assert warnings(host, tmp_path, cfg_with(save_every=30), preview_every=30) == {}


@pytest.mark.parametrize("name", ["adamw8bit", "lion8bit"])
def test_an_8bit_optimizer_without_cuda(host, tmp_path, name):
    p = warnings(host, tmp_path, cfg_with(optimizer={"name": name}))["optimizer.name"]
    assert f"{name} is an 8-bit bitsandbytes optimizer, made for CUDA GPUs, but this run is on cpu" in str(p)
    assert "Fix: choose adamw for optimizer.name" in str(p)
    assert "Fix: choose adamw for Configure LoRA's optimizer" in p.render(COMFY)


@pytest.mark.parametrize("resolution, why", [(256, "blurry"), (1024, "repeated or stretched")])
def test_a_resolution_far_from_the_model_familys_own(host, tmp_path, resolution, why):
    p = warnings(host, tmp_path, cfg_with(), resolution=resolution)["buckets.resolutions"]
    assert f"{resolution} px is far from the 512 px this SD1.5 model was trained at" in str(p) and why in str(p)
    assert "Fix: train at 512 (buckets.resolutions), or within 341-768 px" in str(p)
    assert p.render(COMFY).startswith("Bucket & Cache Latents' resolution: ")


def test_the_warnings_reach_the_runs_text_in_the_front_ends_words(tiny_models, make_latents, tmp_path):
    from trainer.hosts.diffusers_host import DiffusersHost
    from trainer.run import Run

    host = DiffusersHost(tiny_models("sd15"))
    latents, dataset_cfg = make_latents(host, write_shape_dataset(tmp_path / "data", 2))
    cfg = TrainConfig.from_dict({"steps": 2, "batch_size": 1, "network": {"rank": 2, "alpha": 2},
                                 "optimizer": {"warmup_steps": 5}})
    buckets = BucketConfig(resolutions=[64], min_bucket=32, max_bucket=128, step=32)
    results = {}
    for name, naming in (("headless", None), ("comfy", COMFY)):
        results[name] = Run(host, latents, cfg, run_dir=tmp_path / name, dataset_cfg=dataset_cfg, bucket_cfg=buckets,
                            cache_dir=tmp_path / "cache", image_count=2, naming=naming).execute()
    headless, comfy = results["headless"].summary(), results["comfy"].summary()
    assert "note: optimizer.warmup_steps: 5 is not below steps 2" in headless
    assert "note: Configure LoRA's warmup_steps: 5 is not below Train LoRA's steps 2" in comfy
    assert "note: Bucket & Cache Latents' resolution: 64 px is far from the 512 px" in comfy
    assert "Configure LoRA's warmup_steps" in (tmp_path / "comfy" / "estimate.txt").read_text()


def test_memory_advice_on_the_cpu_never_offers_an_8bit_optimizer_and_names_the_widgets(host):
    from trainer.preflight.memory import estimate_training_memory

    cfg = cfg_with(batch_size=4, network=dataclasses.replace(TrainConfig().network, rank=16))
    headless = estimate_training_memory(host, cfg, [(512, 512)], resident_encoders=False)
    in_node = estimate_training_memory(host, cfg, [(512, 512)], resident_encoders=False, naming=COMFY)
    for est in (headless, in_node):
        assert est.device == "cpu" and len(est.suggestions) >= 3
        assert not any("8bit" in s.change or "8-bit" in s.change for s in est.suggestions), est.suggestions
    changes = " | ".join(s.change for s in headless.suggestions)
    assert "lower network.rank 16 -> 8" in changes and "lower batch_size 4 -> 2 (set optimizer.grad_accumulation" \
        in changes and "turn on gradient_checkpointing" in changes
    changes = " | ".join(s.change for s in in_node.suggestions)
    assert "lower Configure LoRA's rank 16 -> 8" in changes and "Configure LoRA's grad_accumulation" in changes
    assert "lower Train LoRA's batch_size 4 -> 2" in changes and "turn on Configure LoRA's gradient_checkpointing" \
        in changes
    assert "network.rank" not in in_node.to_text() and "{" not in in_node.to_text()


def test_naming_renders_markers_and_dotted_keys_but_not_ordinary_words():
    text = f"set {setting_ref('optimizer.warmup_steps')} below {setting_ref('steps')}; network.rank too; " \
           "network.rank_dropout stays; a path a/network.rank.txt stays; steps stay words"
    names = Naming({"optimizer.warmup_steps": "W", "steps": "S", "network.rank": "R", "network.rank_dropout": "D2"})
    assert CONFIG_KEYS.text(text) == ("set optimizer.warmup_steps below steps; network.rank too; "
                                      "network.rank_dropout stays; a path a/network.rank.txt stays; steps stay words")
    assert names.text(text) == "set W below S; R too; D2 stays; a path a/network.rank.txt stays; steps stay words"
    assert names.text("{not a key} {unknown.key}") == "{not a key} unknown.key"
