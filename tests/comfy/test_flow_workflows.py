"""The SD3.5 example workflow, run headless through a real ComfyUI server on a tiny SD3.5-medium checkpoint that
the stock Load Checkpoint detects as SD3: Train LoRA trains on flow (and says so), the saved file loads in stock
LoraLoader with every key consumed, and KSampler with it gives exactly the latent KSampler with Train LoRA's MODEL
gives. (The Flux example's UNETLoader cannot load a tiny Flux: ComfyUI's detection fixes Flux's widths, so Flux is
trained in-process in test_flow_training.py; its example is checked against the server's node schemas.)"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import write_shape_dataset  # noqa: E402
from test_workflows import example, node_text, shrink  # noqa: E402

import tiny_flow  # noqa: E402

pytestmark = [pytest.mark.comfy, pytest.mark.slow]


def test_sd35_example_trains_flow_and_stock_loraloader_matches(comfy, comfy_server, tmp_path_factory):
    from safetensors.torch import load_file

    ckpt = tiny_flow.build_sd3_checkpoint(tmp_path_factory.mktemp("sd3") / "tiny_sd35_medium.ckpt")
    name = comfy_server.add_model("checkpoints", ckpt)
    dataset = write_shape_dataset(comfy_server.input_dir / "shapes_sd35", 3, size=[(64, 64), (96, 64), (64, 64)])
    prompt = shrink(example("sd35"), name, dataset, "example_sd35", steps=4, previews=False)
    prompt["10"]["inputs"].update(steps=2)
    prompt["14"] = {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "latents/sd35_ours"}}
    entry = comfy_server.run_prompt(prompt, timeout=900)
    text = node_text(entry, "5")
    assert "prediction: flow" in text and "token count" not in text and "shifted" in text, text
    saved = comfy_server.models_dir / "loras" / "loralab" / "example_sd35.safetensors"
    keys = load_file(saved)
    assert keys and all(k.startswith("lora_unet_joint_blocks_") for k in keys)

    log_start = len(comfy_server.log_text())
    loaded = {k: v for k, v in copy.deepcopy(prompt).items() if k in ("1", "7", "8", "9", "10", "14")}
    loaded["20"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                          "lora_name": "loralab/example_sd35.safetensors",
                                                          "strength_model": 1.0, "strength_clip": 1.0}}
    loaded["7"]["inputs"]["clip"] = loaded["8"]["inputs"]["clip"] = ["20", 1]
    loaded["10"]["inputs"]["model"] = ["20", 0]
    loaded["14"]["inputs"]["filename_prefix"] = "latents/sd35_stock"
    comfy_server.run_prompt(loaded, timeout=600)
    log = comfy_server.log_text()[log_start:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log

    def latent(prefix):
        return load_file(next((comfy_server.output_dir / "latents").glob(f"{prefix}_*.latent")))["latent_tensor"]

    assert torch.equal(latent("sd35_ours"), latent("sd35_stock"))
