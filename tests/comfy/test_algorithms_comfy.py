"""LoRA, LoHa, LoKr and DoRA trained through the ComfyUI host on ComfyUI's own tiny SD1.5 / SDXL models: 40 CPU
steps lower the fixed-grid loss, the saved file loads in stock LoraLoader with every key consumed (no "lora key not
loaded"), the MODEL it patches gives the output our hooks gave (max abs diff <= 1e-3 on a fixed latent), and the
base MODEL is bit-identical afterwards. Also: every target kind (3x3 convs, text encoders) of every algorithm maps
onto ComfyUI's weight adapters with ComfyUI's own scale, axis and Kronecker conventions."""
from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_checks import assert_unchanged, snapshot  # noqa: E402
from grid_loss import fixed_grid_loss  # noqa: E402
from shapes import write_shape_dataset  # noqa: E402

pytestmark = pytest.mark.comfy

GRID = [100, 300, 500, 700, 900]
VARIANTS = {
    "lora": {"algorithm": "lora"}, "loha": {"algorithm": "loha"}, "lokr": {"algorithm": "lokr"},
    "lokr_full": {"algorithm": "lokr", "lokr_full_matrix": True}, "dora": {"algorithm": "dora"},
}


@pytest.fixture
def pack(loralab_pack):
    return lambda name: importlib.import_module(f"loralab_pack.{name}")


def latents_for(pack, host, folder, tmp_path):
    config = pack("trainer.config")
    dataset_cfg = config.DatasetConfig(folder=str(folder))
    buckets = config.BucketConfig(resolutions=[64], min_bucket=32, max_bucket=128, step=32)
    dataset = pack("trainer.data.dataset").scan_dataset(dataset_cfg)
    latents = pack("trainer.data.cache").prepare_latents(dataset, buckets, host.encode_images, host.image_encoder_id,
                                                         tmp_path / "cache")
    return latents, dataset_cfg


def fixed_inputs(pack, host, kind: str):
    """One fixed latent, timestep and caption conditioning (SDXL: with its pooled text and size embedding)."""
    Conditioning = pack("trainer.hosts.base").Conditioning
    g = torch.Generator().manual_seed(7)
    noisy = torch.randn(1, 4, 8, 8, generator=g)
    item = host.encode_text(["a red square on grass"])[0]
    pooled = item.get("pooled")
    sizes = torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=torch.float32) if kind == "sdxl" else None
    cond = Conditioning(item["context"].unsqueeze(0).float(), pooled.unsqueeze(0).float() if pooled is not None
                        else None, sizes)
    return noisy, torch.tensor([400.0]), cond


def load_in_comfyui(comfy, model, clip, sd, caplog):
    """Stock LoraLoader's path (comfy.sd.load_lora_for_models), checking that every key of the file was consumed."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(sd, key_map)
        model_lora, clip_lora = comfy.sd.load_lora_for_models(model, clip, sd, 1.0, 1.0 if clip is not None else 0.0)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "lora key not loaded" in m or "NOT LOADED" in m], messages[:5]
    return patches, model_lora, clip_lora


@pytest.mark.slow  # ~9 minutes for the ten runs on 2 CPU cores; the fast test below checks every layer kind
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_trained_file_reproduces_in_stock_loraloader(pack, comfy, tiny_models, tmp_path, caplog, variant, kind):
    model, clip, vae = tiny_models(kind)
    unet = model.model.diffusion_model
    before = snapshot(unet)
    host = pack("nodes.comfy_host").ComfyHost(model.clone(), clip, vae)
    latents, dataset_cfg = latents_for(pack, host, write_shape_dataset(tmp_path / "data", 4), tmp_path)
    cfg = pack("trainer.config").TrainConfig.from_dict({
        "steps": 40, "batch_size": 2, "seed": 0, "network": {"rank": 8, "alpha": 8, "targets": "full",
                                                             **VARIANTS[variant]},
        "optimizer": {"learning_rate": 3e-3, "scheduler": "constant", "weight_decay": 0.0},
        "objective": {"min_snr_gamma": 0.0}})
    start = fixed_grid_loss(host, latents, cfg, GRID)
    result = pack("trainer.training.loop").train(host, latents, cfg, tmp_path / "run", dataset_cfg=dataset_cfg)
    with result.network.attached():
        end = fixed_grid_loss(host, latents, cfg, GRID)
    assert end <= 0.85 * start, f"{variant} on {kind}: fixed-grid loss {start:.4f} -> {end:.4f}"
    assert_unchanged(unet, before)

    lora_file = pack("trainer.files.lora_file")
    meta = lora_file.build_metadata(cfg, kind, "epsilon", 64)
    path = lora_file.save_lora(tmp_path / "trained.safetensors", result.network.kohya_state_dict(), meta, dtype="fp32")
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    noisy, t, cond = fixed_inputs(pack, host, kind)
    with torch.no_grad():
        base = host.predict(noisy, t, cond)
        with result.network.attached():
            ours = host.predict(noisy, t, cond)  # Train LoRA's adapters, as trained
    patches, model_lora, _ = load_in_comfyui(comfy, model, None, sd, caplog)
    assert len(patches) == len(result.network)  # one ComfyUI patch per adapter
    comfy.mm.load_models_gpu([model_lora], force_full_load=True)  # what KSampler does with the LoRA'd MODEL
    try:
        with torch.no_grad():
            theirs = host.predict(noisy, t, cond)  # the shared UNet now holds ComfyUI's merged weights
    finally:
        comfy.mm.unload_all_models()
    effect = (ours - base).abs().max()
    assert effect > 1e-2  # the comparison below means something
    assert (ours - theirs).abs().max() <= 1e-3, f"{variant} on {kind}: {(ours - theirs).abs().max():.2e}"
    assert_unchanged(unet, before)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_target_kind_maps_onto_comfyuis_adapters(pack, comfy, tiny_models, caplog, variant):
    """Random adapters on every UNet layer kind (Linear, 1x1 and 3x3 convs) and the SDXL text encoders, with alpha
    != rank (so the scale rule matters): ComfyUI consumes every key, and its patched UNet and CLIP give what our
    hooks give."""
    model, clip, vae = tiny_models("sdxl")
    host = pack("nodes.comfy_host").ComfyHost(model.clone(), clip, vae)
    targets_mod = pack("trainer.adapters.targets")
    targets = host.adapter_targets("full", True, False) + targets_mod.all_text_encoder_targets(host.text_encoders())
    NetworkConfig = pack("trainer.config").NetworkConfig
    network = pack("trainer.adapters.network").LoRANetwork(
        targets, NetworkConfig(rank=4, alpha=3, targets="full", conv_rank=2, conv_alpha=5, **VARIANTS[variant]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    unet_before, clip_before = snapshot(model.model.diffusion_model), snapshot(clip.cond_stage_model)
    sd = network.kohya_state_dict()
    noisy, t, cond = fixed_inputs(pack, host, "sdxl")
    caption = "a red square"
    with torch.no_grad():
        base = host.predict(noisy, t, cond)
        base_text = clip.encode_from_tokens(clip.tokenize(caption))
        with network.attached():
            ours = host.predict(noisy, t, cond)
            ours_text = host.encode_text([caption])[0]["context"]
    patches, model_lora, clip_lora = load_in_comfyui(comfy, model, clip, sd, caplog)
    assert len(patches) == len(network)
    theirs_text = clip_lora.encode_from_tokens(clip_lora.tokenize(caption))
    comfy.mm.load_models_gpu([model_lora], force_full_load=True)
    try:
        with torch.no_grad():
            theirs = host.predict(noisy, t, cond)
    finally:
        comfy.mm.unload_all_models()
    assert (ours - base).abs().max() > 1e-2
    assert (ours - theirs).abs().max() <= 1e-3, f"{variant}: {(ours - theirs).abs().max():.2e}"
    # ComfyUI merges into the CLIP's fp16 weights; our adapters add in fp32: equal up to fp16 rounding
    text_effect = (theirs_text.float() - base_text.float()).abs().max()
    assert text_effect > 1e-3
    assert (theirs_text[0].float() - ours_text).abs().max() < 0.02 * text_effect
    assert_unchanged(model.model.diffusion_model, unet_before)
    assert_unchanged(clip.cond_stage_model, clip_before)


def test_configure_lora_sets_the_algorithm_and_loraplus(pack):
    """The node's widgets reach the config (and its summary); every new widget explains itself."""
    node = pack("nodes.config_node").ConfigureLoRA
    inputs = {i.id: i for i in node.define_schema().inputs}
    for name in ("algorithm", "lokr_factor", "lokr_full_matrix", "loraplus_lr_ratio"):
        assert inputs[name].tooltip
    assert list(inputs["algorithm"].options) == ["lora", "loha", "lokr", "dora"]
    settings = dict(preset="custom", rank=8, alpha=8.0, dropout=0.0, targets="full", conv_rank=0, optimizer="adamw",
                    learning_rate=1e-4, text_encoder_lr=0.0, scheduler="constant", warmup_steps=0, weight_decay=0.01,
                    max_grad_norm=1.0, grad_accumulation=1, loss="mse", timestep_sampling="uniform",
                    min_snr_gamma=5.0, noise_offset=0.0, mixed_precision="auto", gradient_checkpointing=False,
                    train_text_encoder=False, ema_decay=0.0, clip_skip=1)
    default = node.execute(**settings).result[0]
    assert default.network.algorithm == "lora" and default.optimizer.loraplus_lr_ratio == 0
    cfg, summary = node.execute(**settings, algorithm="lokr", lokr_factor=8, lokr_full_matrix=True,
                                loraplus_lr_ratio=16.0).result
    assert (cfg.network.algorithm, cfg.network.lokr_factor, cfg.network.lokr_full_matrix) == ("lokr", 8, True)
    assert cfg.optimizer.loraplus_lr_ratio == 16.0
    assert "LoKr full matrix (factor 8)" in summary and "LoRA+ ratio 16" in summary
    dora = node.execute(**settings, algorithm="dora").result[1]
    assert "network: DoRA rank 8" in dora
