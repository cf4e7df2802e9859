"""The headless CLI: `python -m trainer train --config FILE` on a local diffusers folder, and `python -m trainer demo`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from shapes import write_shape_dataset

from trainer.__main__ import main
from trainer.demo.tiny_models import build_tiny_pipeline


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("model") / "sd15", "sd15")


def write_config(tmp_path, model, **train) -> Path:
    config = tmp_path / "lora.yaml"
    steps = train.pop("steps", 4)
    config.write_text(f"""
model: {model}
dataset: {{folder: data, trigger_word: shp}}
buckets: {{resolutions: [64], min_bucket: 32, max_bucket: 128, step: 32}}
train:
  steps: {steps}
  batch_size: 2
  save_every: 2
  network: {{rank: 4, alpha: 4}}
  optimizer: {{learning_rate: 1.0e-3}}
output: {{run_dir: runs/shapes, lora: out/shapes.safetensors}}
title: shapes test
""", encoding="utf-8")
    return config


def test_train_from_a_yaml_config_writes_the_lora_plot_estimate_and_state(tmp_path, model_folder, capsys):
    write_shape_dataset(tmp_path / "data", 4)
    config = write_config(tmp_path, model_folder)
    assert main(["train", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "Memory estimate (cpu)" in out and "saved LoRA" in out  # the estimate is printed before training
    lora = tmp_path / "out" / "shapes.safetensors"  # paths are relative to the config file
    with safe_open(str(lora), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert meta["ss_base_model_version"].startswith("sd_v1") and meta["modelspec.title"] == "shapes test"
    run = tmp_path / "runs" / "shapes"
    assert (run / "loss.png").stat().st_size > 1000
    assert (run / "estimate.txt").read_text().startswith("Memory estimate (cpu)")
    assert [line for line in (run / "history.jsonl").read_text().splitlines() if '"step"' in line]
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 4


def test_ctrl_c_saves_a_state_and_resume_finishes_the_run(tmp_path, model_folder, monkeypatch, capsys):
    from trainer.hosts.diffusers_host import DiffusersHost

    write_shape_dataset(tmp_path / "data", 4)
    config = str(write_config(tmp_path, model_folder, steps=4))
    calls = []

    def ctrl_c_at_step_3(self):
        calls.append(1)
        if len(calls) == 3:  # checked once per optimizer step: steps 1 and 2 are done
            raise KeyboardInterrupt

    monkeypatch.setattr(DiffusersHost, "check_interrupt", ctrl_c_at_step_3)
    assert main(["train", "--config", config]) == 130
    assert "run again with --resume" in capsys.readouterr().err
    run = tmp_path / "runs" / "shapes"
    assert sorted(p.name for p in (run / "state").iterdir()) == ["step_000002"]
    assert not (tmp_path / "out" / "shapes.safetensors").exists()

    monkeypatch.undo()
    assert main(["train", "--config", config, "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "history.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == [1, 2, 3, 4]  # steps 1-2 once, then 3-4 from the saved state
    assert (tmp_path / "out" / "shapes.safetensors").is_file()


@pytest.mark.parametrize("text, expected", [
    ("model: m\nlearning_rate: 1\n", "unknown top-level setting(s) learning_rate"),
    ("dataset: {folder: d}\n", "setting 'model' is missing"),
    ("model: m\ntrain: {optimizer: {learning_rat: 1}}\n", "learning_rat"),
])
def test_bad_config_is_one_clear_line(tmp_path, capsys, text, expected):
    config = tmp_path / "bad.yaml"
    config.write_text(text, encoding="utf-8")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and "Traceback" not in err


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.json")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_demo_trains_and_writes_its_outputs(tmp_path):
    from trainer.demo import run_demo

    lines = []
    summary = run_demo(tmp_path / "demo", steps=4, echo=lines.append)
    assert summary["steps"] == 4 and (tmp_path / "demo" / "demo_lora.safetensors").is_file()
    assert (tmp_path / "demo" / "demo_lora_ema.safetensors").is_file()  # the demo keeps an EMA of the adapters
    assert (tmp_path / "demo" / "run" / "loss.png").is_file()
    assert any(line.startswith("demo finished") for line in lines)
    # the file `python -m trainer train --config` (also under torchrun, tests/test_distributed.py) trains
    config = json.loads((tmp_path / "demo" / "demo_config.json").read_text())
    assert config["train"]["steps"] == 4 and config["output"]["run_dir"] == str(tmp_path / "demo" / "run")
