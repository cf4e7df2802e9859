"""The example workflows' API twins, run headless through a real ComfyUI server on the tiny checkpoints.

Checks: train-then-generate works end to end (SD1.5, SDXL); the saved file (UNet and text-encoder adapters) loads in
stock LoraLoader with no "lora key not loaded" and KSampler with it gives the same latent as KSampler with Train
LoRA's MODEL and CLIP outputs;
live progress events arrive for the node; Stop leaves a run folder from which queueing again finishes with the same
adapters as an unstopped run; a finished run is reused instead of retrained.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shapes import write_shape_dataset  # noqa: E402

pytestmark = [pytest.mark.comfy, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def example(family: str) -> dict:
    return json.loads((ROOT / "example_workflows" / "api" / f"train_then_generate_{family}.json").read_text())


def shrink(prompt: dict, ckpt: str, dataset: Path, run_name: str, steps: int = 4, lora_name: str = "",
           previews: bool = True) -> dict:
    """The example as shipped, with tiny-model sizes: the same graph, smaller numbers."""
    p = copy.deepcopy(prompt)
    p["1"]["inputs"]["ckpt_name"] = ckpt
    p["2"]["inputs"].update(folder=str(dataset), caption_dropout=0.0)
    p["3"]["inputs"].update(resolution=64, min_bucket=64, max_bucket=128, bucket_step=64)
    p["4"]["inputs"].update(mixed_precision="no", rank=4, alpha=4.0, warmup_steps=0)
    p["5"]["inputs"].update(steps=steps, save_every=2, run_name=run_name, preview_every=2 if previews else 0)
    p["6"]["inputs"].update(filename=lora_name or f"loralab/{run_name}", dtype="fp32")
    p["9"]["inputs"].update(width=64, height=64)
    p["10"]["inputs"].update(steps=2)
    return p


def run_dirs(server, run_name: str) -> list[Path]:
    return sorted((server.output_dir / "loralab" / "runs").glob(f"{run_name}-*"))


@pytest.fixture(scope="module")
def dataset(comfy_server):
    return write_shape_dataset(comfy_server.input_dir / "shapes", 4, size=[(64, 64), (96, 64), (64, 96), (64, 64)])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_example_workflow_trains_then_generates(comfy_server, comfy_ws, tiny_checkpoints, dataset, family):
    # Previews are exercised on SD1.5 only: sampling the tiny SDXL on a CPU costs minutes for nothing new.
    prompt = shrink(example(family), tiny_checkpoints[family].name, dataset, f"example_{family}",
                    previews=family == "sd15")
    entry = comfy_server.run_prompt(prompt, client_id=comfy_ws.client_id, timeout=900)
    images = comfy_server.output_files(entry)
    assert any(p.name.startswith(f"loralab_{family}") and p.is_file() for p in images)
    saved = comfy_server.models_dir / "loras" / "loralab" / f"example_{family}.safetensors"
    assert saved.is_file()
    run = run_dirs(comfy_server, f"example_{family}")[-1]
    assert (run / "final.safetensors").is_file() and (run / "history.jsonl").is_file()
    if family == "sd15":
        assert sorted(p.name for p in (run / "previews").glob("*.png")) == ["step_000002.png", "step_000004.png"]
    events = [m["data"] for m in comfy_ws.of_type("loralab.progress")]
    assert events and {e["node"] for e in events} == {"5"} and events[-1]["phase"] == "done"
    assert any(e["phase"] == "training" and e["loss"] is not None for e in events)


def test_saved_lora_in_stock_loraloader_matches_the_in_graph_model(comfy_server, tiny_checkpoints, dataset):
    # With text-encoder adapters too: stock LoraLoader applies both parts (strength_model and strength_clip).
    ckpt = tiny_checkpoints["sd15"].name
    trained = shrink(example("sd15"), ckpt, dataset, "interop", previews=False)
    trained["4"]["inputs"].update(train_text_encoder=True)
    trained["14"] = {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "latents/ours"}}
    comfy_server.run_prompt(trained, timeout=900)
    log_start = len(comfy_server.log_text())

    loaded = {k: v for k, v in copy.deepcopy(trained).items() if k in ("1", "7", "8", "9", "10")}
    loaded["20"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                          "lora_name": "loralab/interop.safetensors",
                                                          "strength_model": 1.0, "strength_clip": 1.0}}
    loaded["7"]["inputs"]["clip"] = loaded["8"]["inputs"]["clip"] = ["20", 1]
    loaded["10"]["inputs"]["model"] = ["20", 0]
    loaded["14"] = {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "latents/stock"}}
    comfy_server.run_prompt(loaded, timeout=600)
    log = comfy_server.log_text()[log_start:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log

    from safetensors.torch import load_file

    saved = load_file(comfy_server.models_dir / "loras" / "loralab" / "interop.safetensors")
    assert any(k.startswith("lora_te_") for k in saved) and any(k.startswith("lora_unet_") for k in saved)
    ours = load_file(next((comfy_server.output_dir / "latents").glob("ours_*.latent")))["latent_tensor"]
    stock = load_file(next((comfy_server.output_dir / "latents").glob("stock_*.latent")))["latent_tensor"]
    assert torch.equal(ours, stock)
    base = {k: v for k, v in copy.deepcopy(loaded).items() if k != "20"}
    base["7"]["inputs"]["clip"] = base["8"]["inputs"]["clip"] = ["1", 1]
    base["10"]["inputs"]["model"] = ["1", 0]
    base["14"]["inputs"]["filename_prefix"] = "latents/base"
    comfy_server.run_prompt(base, timeout=600)
    without = load_file(next((comfy_server.output_dir / "latents").glob("base_*.latent")))["latent_tensor"]
    assert not torch.equal(ours, without)  # the LoRA does something, so the equality above means something


def test_stop_then_queue_again_finishes_like_an_unstopped_run(comfy_server, comfy_ws, tiny_checkpoints, dataset):
    from safetensors.torch import load_file

    def prompt(name):
        p = shrink(example("sd15"), tiny_checkpoints["sd15"].name, dataset, name, steps=40, previews=False)
        p["5"]["inputs"]["save_every"] = 0
        return {k: v for k, v in p.items() if k in ("1", "2", "3", "4", "5")}

    prompt_id = comfy_server.queue_prompt(prompt("stopped"), client_id=comfy_ws.client_id)
    comfy_ws.wait_for(lambda m: m.get("type") == "loralab.progress" and m["data"].get("phase") == "training"
                      and (m["data"].get("step") or 0) >= 3, timeout=600)
    comfy_server.interrupt()
    with pytest.raises(Exception, match="(?i)interrupt"):
        comfy_server.wait(prompt_id, timeout=300)
    run = run_dirs(comfy_server, "stopped")[-1]
    snapshots = sorted((run / "state").glob("step_*"))
    assert snapshots and 3 <= int(snapshots[-1].name[5:]) < 40
    assert not (run / "final.safetensors").exists()

    comfy_server.run_prompt(prompt("stopped"), timeout=900)  # same settings: continues from the saved state
    comfy_server.run_prompt(prompt("straight"), timeout=900)
    resumed = load_file(run / "final.safetensors")
    straight = load_file(run_dirs(comfy_server, "straight")[-1] / "final.safetensors")
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in resumed)
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h] == list(range(1, 41))
    assert any(h.get("mark") == "resume" for h in history)

    started = time.monotonic()
    comfy_server.free()  # drop ComfyUI's cached outputs' models; the finished run is found on disk by its key
    p = prompt("straight")
    p["5"]["inputs"]["seed"] = 0  # unchanged settings
    comfy_server.run_prompt(p, timeout=300)
    assert len(list((run_dirs(comfy_server, "straight")[-1] / "state").glob("step_*"))) >= 1
    assert time.monotonic() - started < 120


def node_text(entry: dict, node: str) -> str:
    return "\n".join(entry["outputs"][node]["text"])


def test_run_identity_survives_ksampler_and_neutral_changes_and_ema_files_load(comfy_server, tiny_checkpoints,
                                                                                  dataset):
    """KSampler on Train LoRA's MODEL patches the shared weights in place; queueing again with only save_every
    changed re-runs Train LoRA, which must find its finished run (same identity) instead of retraining. With EMA on,
    Save LoRA writes <name>_ema.safetensors too, and stock LoraLoader loads both files with every key."""
    prompt = shrink(example("sd15"), tiny_checkpoints["sd15"].name, dataset, "identity", previews=False)
    prompt["4"]["inputs"]["ema_decay"] = 0.9
    first = comfy_server.run_prompt(prompt, timeout=900)
    assert "trained: 4 steps" in node_text(first, "5") and "EMA weights: kept" in node_text(first, "5")
    run = run_dirs(comfy_server, "identity")
    assert len(run) == 1
    history = (run[0] / "history.jsonl").read_text()

    again = copy.deepcopy(prompt)
    again["5"]["inputs"].update(save_every=3, model_weights="ema")  # and the MODEL output now carries the EMA
    again["14"] = {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "latents/ema_ours"}}
    second = comfy_server.run_prompt(again, timeout=600)
    assert "reused the finished run: 4 steps" in node_text(second, "5")
    assert "MODEL output: ema weights" in node_text(second, "5")
    assert run_dirs(comfy_server, "identity") == run and (run[0] / "history.jsonl").read_text() == history

    loras = comfy_server.models_dir / "loras" / "loralab"
    assert (loras / "identity.safetensors").is_file() and (loras / "identity_ema.safetensors").is_file()
    log_start = len(comfy_server.log_text())
    for name, saved_as in (("identity.safetensors", "raw_stock"), ("identity_ema.safetensors", "ema_stock")):
        loaded = {k: v for k, v in copy.deepcopy(prompt).items() if k in ("1", "7", "8", "9", "10")}
        loaded["20"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                              "lora_name": f"loralab/{name}",
                                                              "strength_model": 1.0, "strength_clip": 1.0}}
        loaded["7"]["inputs"]["clip"] = loaded["8"]["inputs"]["clip"] = ["20", 1]
        loaded["10"]["inputs"]["model"] = ["20", 0]
        loaded["14"] = {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0],
                                                              "filename_prefix": f"latents/{saved_as}"}}
        comfy_server.run_prompt(loaded, timeout=600)
    log = comfy_server.log_text()[log_start:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log

    from safetensors.torch import load_file

    def latent(prefix):
        return load_file(next((comfy_server.output_dir / "latents").glob(f"{prefix}_*.latent")))["latent_tensor"]

    # model_weights=ema: Train LoRA's MODEL is exactly stock LoraLoader with the _ema file, and differs from the raw
    assert torch.equal(latent("ema_ours"), latent("ema_stock"))
    assert not torch.equal(latent("ema_stock"), latent("raw_stock"))


def test_model_sampling_discrete_node_makes_train_lora_train_on_v(comfy_server, tiny_checkpoints, dataset):
    """The core ModelSamplingDiscrete node (v_prediction, zsnr) in front of Train LoRA: it trains on v, and says so."""
    p = shrink(example("sd15"), tiny_checkpoints["sd15"].name, dataset, "vpatched", steps=2, previews=False)
    p = {k: v for k, v in p.items() if k in ("1", "2", "3", "4", "5")}
    p["30"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": "v_prediction",
                                                                "zsnr": True}}
    p["4"]["inputs"]["model"] = p["5"]["inputs"]["model"] = ["30", 0]
    text = node_text(comfy_server.run_prompt(p, timeout=600), "5")
    assert "prediction: v (1000-step discrete schedule, zero terminal SNR)" in text
    p["30"]["inputs"]["sampling"] = "lcm"
    with pytest.raises(Exception, match="lcm"):
        comfy_server.run_prompt(p, timeout=600)
