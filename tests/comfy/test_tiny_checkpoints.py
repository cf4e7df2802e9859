"""Smoke tests: the tiny checkpoints load in ComfyUI with the expected classes, and run end to end in a real server."""
from __future__ import annotations

import pytest

try:
    from . import harness, tiny_checkpoints
except ImportError:
    import harness  # type: ignore[no-redef]
    import tiny_checkpoints  # type: ignore[no-redef]


@pytest.mark.comfy
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_tiny_checkpoint_loads_in_process(comfy, tiny_models, kind):
    import torch

    spec = tiny_checkpoints.SPECS[kind]
    model, clip, vae = tiny_models(kind)
    base = model.model
    assert type(base).__name__ == spec["model_class"]
    assert type(base) is (comfy.model_base.SDXL if kind == "sdxl" else comfy.model_base.BaseModel)
    assert type(base.model_config).__name__ == spec["config"]
    assert base.model_type.name == spec["model_type"]
    ms = model.get_model_object("model_sampling")
    assert isinstance(ms, comfy.model_sampling.EPS)
    assert base.latent_format.scale_factor == pytest.approx(spec["latent_scale"])
    assert type(vae.first_stage_model).__name__ == "TAESD"

    cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo of a cat"), return_pooled=True)
    other = clip.encode_from_tokens(clip.tokenize("a red house"))
    assert cond.shape == (1, 77, spec["context_dim"]) and pooled.shape == (1, spec["pooled_dim"])
    assert torch.isfinite(cond).all() and (cond - other).abs().mean() > 1e-3

    latent = vae.encode(torch.rand(1, 64, 64, 3))
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()

    # One direct denoiser call on the model's own parameterization (what the trainer does).
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10.0, 900.0])
    kwargs = {}
    if kind == "sdxl":
        kwargs["y"] = base.encode_adm(pooled_output=pooled.repeat(2, 1), width=64, height=64, crop_w=0, crop_h=0,
                                      target_width=64, target_height=64, device=x.device)
    out = base.diffusion_model(x, t, context=cond.repeat(2, 1, 1), **kwargs)
    assert out.shape == x.shape and torch.isfinite(out).all() and out.std() > 1e-3
    assert (out[0] - out[1]).abs().mean() > 1e-4  # depends on the timestep


@pytest.mark.comfy
def test_sdxl_vpred_variant(comfy, tiny_models):
    model, _, _ = tiny_models("sdxl_vpred")
    assert type(model.model) is comfy.model_base.SDXL
    assert isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)


@pytest.mark.comfy
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_txt2img_through_server(comfy_server, tiny_checkpoints, kind):
    name = tiny_checkpoints[kind].name
    entry = comfy_server.run_prompt(harness.txt2img_prompt(name, prefix=f"smoke_{kind}"), timeout=600)
    files = comfy_server.output_files(entry)
    assert len(files) == 1 and files[0].is_file() and files[0].stat().st_size > 0, entry["outputs"]


@pytest.mark.comfy
@pytest.mark.slow
def test_separate_taesd_file_and_fast_loader(comfy_server, tiny_checkpoints):
    """VAELoader reads the separate TAESD file; the test-only loader gives a cheap CLIP."""
    prompt = harness.txt2img_prompt(tiny_checkpoints["sd15"].name, prefix="smoke_vae")
    prompt["1"] = {"class_type": "LoraLabTest_TinyCheckpointLoader",
                   "inputs": {"ckpt_name": tiny_checkpoints["sd15"].name, "te_layers": 3}}
    prompt["7"] = {"class_type": "VAELoader", "inputs": {"vae_name": tiny_checkpoints["vae"].name}}
    prompt["5"]["inputs"]["vae"] = ["7", 0]
    entry = comfy_server.run_prompt(prompt, timeout=600)
    assert comfy_server.output_files(entry)[0].is_file()


@pytest.mark.comfy
@pytest.mark.slow
def test_errors_websocket_and_interrupt(comfy_server, comfy_ws):
    # Validation errors come back as PromptRejected with ComfyUI's node error text.
    with pytest.raises(harness.PromptRejected, match="ckpt_name"):
        comfy_server.queue_prompt(harness.txt2img_prompt("missing.safetensors"))
    # Custom events reach the websocket client that queued the prompt.
    prompt = {"1": {"class_type": "LoraLabTest_SendEvent",
                    "inputs": {"event": "loralab_test.event", "payload": '{"step": 3}'}}}
    pid = comfy_server.queue_prompt(prompt, client_id=comfy_ws.client_id)
    comfy_server.wait(pid, timeout=60)
    msgs = comfy_ws.wait_done(pid, timeout=60)
    custom = [m for m in msgs if m["type"] == "loralab_test.event"]
    assert custom and custom[0]["data"]["step"] == 3 and custom[0]["data"]["node"] == "1"
    # interrupt() stops a running prompt; run_prompt raises PromptInterrupted.
    wait = {"1": {"class_type": "LoraLabTest_Wait", "inputs": {"steps": 600, "step_s": 0.05}}}
    pid = comfy_server.queue_prompt(wait, client_id=comfy_ws.client_id)
    comfy_ws.wait_for(lambda m: m.get("type") == "progress" and m["data"].get("prompt_id") == pid, timeout=60)
    comfy_server.interrupt()
    with pytest.raises(harness.PromptInterrupted):
        comfy_server.wait(pid, timeout=60)


@pytest.mark.comfy
@pytest.mark.slow
def test_our_pack_registers_nodes(comfy_server):
    """LoRA Lab itself imports inside ComfyUI and registers LoraLab_* nodes."""
    info = comfy_server.object_info()
    ours = sorted(k for k in info if k.startswith("LoraLab_"))
    assert ours, ("no LoraLab_* node registered; ComfyUI log:\n" + comfy_server.log_tail(4000))
    assert all(info[k]["category"].startswith("LoRA Lab") for k in ours)
