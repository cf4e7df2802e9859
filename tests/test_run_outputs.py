"""A run's optional outputs, headless: TensorBoard event files (read back with TensorBoard's own reader) and
numbered intermediate LoRAs with the run folder's manifest."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from safetensors import safe_open
from shapes import write_shape_dataset

from trainer.__main__ import main
from trainer.demo.tiny_models import build_tiny_pipeline
from trainer.files.numbered import existing_numbered, step_of
from trainer.outputs import numbered_step

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
NO_TENSORBOARD = "the tensorboard package is not installed (pip install tensorboard; CI installs it with .[test])"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("model") / "sd15", "sd15")


def write_config(tmp_path: Path, model: Path, steps: int = 4, **output) -> Path:
    write_shape_dataset(tmp_path / "data", 2)
    config = {
        "model": str(model), "dataset": {"folder": "data"},
        "buckets": {"resolutions": [64], "min_bucket": 32, "max_bucket": 128, "step": 32},
        "train": {"steps": steps, "batch_size": 1, "save_every": 2, "network": {"rank": 4, "alpha": 4}},
        "output": {"run_dir": "runs/tb", "lora": "out/tb.safetensors", **output},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


@pytest.mark.skipif(not HAS_TENSORBOARD, reason=NO_TENSORBOARD)
def test_headless_tensorboard_logs_every_step(tmp_path, model_folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = write_config(tmp_path, model_folder, steps=5, tensorboard=True)
    assert main(["train", "--config", str(config)]) == 0
    run = tmp_path / "runs" / "tb"
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    logged = scalars(run / "tensorboard", "loss")
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5]
    assert [v for _, v in logged] == pytest.approx([v for _, v in losses], rel=1e-6)  # float32 in the event file
    accumulator = EventAccumulator(str(run / "tensorboard"))
    accumulator.Reload()
    assert {"loss", "loss_ema", "lr", "grad_norm", "memory/allocated_mib", "memory/peak_mib"} <= set(
        accumulator.Tags()["scalars"])
    assert all(v > 0 for _, v in scalars(run / "tensorboard", "grad_norm"))


@pytest.mark.skipif(not HAS_TENSORBOARD, reason=NO_TENSORBOARD)
def test_a_resumed_run_hides_the_steps_it_trains_again(tmp_path, model_folder, monkeypatch):
    """A crash after step 3 leaves the step-2 snapshot: resuming trains 3 again, and TensorBoard shows each step once
    (the new session purges the old step 3) with the EMA going on from the run's history."""
    from trainer.hosts.diffusers_host import DiffusersHost

    config = str(write_config(tmp_path, model_folder, steps=5, tensorboard=True))
    calls = []

    def crash_in_step_4(self):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("power cut")

    monkeypatch.setattr(DiffusersHost, "check_interrupt", crash_in_step_4)
    with pytest.raises(RuntimeError, match="power cut"):
        main(["train", "--config", config])
    tensorboard = tmp_path / "runs" / "tb" / "tensorboard"
    assert [s for s, _ in scalars(tensorboard, "loss")] == [1, 2, 3]
    monkeypatch.undo()
    assert main(["train", "--config", config, "--resume"]) == 0
    assert len(list(tensorboard.glob("events.out.tfevents.*"))) == 2
    assert [s for s, _ in scalars(tensorboard, "loss")] == [1, 2, 3, 4, 5]
    from trainer.monitor.events import ema_series

    losses = [v for _, v in scalars(tensorboard, "loss")]
    assert [v for _, v in scalars(tensorboard, "loss_ema")] == pytest.approx(ema_series(losses), rel=1e-5)


def test_tensorboard_missing_is_a_clear_message(tmp_path, model_folder, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    config = write_config(tmp_path, model_folder, tensorboard=True)
    assert main(["train", "--config", str(config)]) != 0
    err = capsys.readouterr()
    assert ("error: output.tensorboard is on, but the tensorboard package is not installed in this Python; install "
            "it (pip install tensorboard, with the Python that runs training) or turn it off") in err.out + err.err
    assert not (tmp_path / "runs" / "tb" / "history.jsonl").exists()  # refused before any training


def test_numbered_loras_at_every_save_and_the_end(tmp_path, model_folder):
    config = write_config(tmp_path, model_folder, steps=5, numbered_loras=True)
    assert main(["train", "--config", str(config)]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("tb-*.safetensors")) == [
        "tb-000002.safetensors", "tb-000004.safetensors", "tb-000005.safetensors"]
    run = tmp_path / "runs" / "tb"
    assert [(s, p.name) for s, p in existing_numbered(run)] == [
        (2, "tb-000002.safetensors"), (4, "tb-000004.safetensors"), (5, "tb-000005.safetensors")]
    for step, path in existing_numbered(run):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            assert all(k.startswith("lora_unet_") for k in f.keys())
        assert meta["ss_steps"] == str(step) and meta["modelspec.title"].endswith(f"(step {step})")
        assert step_of(path) == step
    # the last one is the final LoRA
    with safe_open(str(out / "tb-000005.safetensors"), framework="pt") as a, \
            safe_open(str(out / "tb.safetensors"), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(a.get_tensor(k).equal(b.get_tensor(k)) for k in a.keys())


def test_which_steps_get_a_numbered_lora():
    assert [s for s in range(1, 8) if numbered_step(s, save_every=3, steps=7)] == [3, 6, 7]
    assert [s for s in range(1, 5) if numbered_step(s, save_every=0, steps=4)] == [4]


def test_output_switches_must_be_booleans(tmp_path, model_folder, capsys):
    config = write_config(tmp_path, model_folder, tensorboard="yes")
    assert main(["train", "--config", str(config)]) != 0
    err = capsys.readouterr()
    assert "output.tensorboard = 'yes' must be true or false" in err.out + err.err
