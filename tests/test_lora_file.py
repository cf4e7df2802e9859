"""The LoRA file: loads in diffusers with the same effect as our hooks, carries kohya metadata, is written atomically."""
import hashlib
import json
import logging

import pytest
import torch

from trainer.adapters.network import LoRANetwork
from trainer.config import NetworkConfig, ObjectiveConfig, OptimizerConfig, TrainConfig
from trainer.files.lora_file import LoRAFileError, build_metadata, load_lora, save_lora


def load_pipeline(folder, family):
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    parts = dict(vae=AutoencoderKL.from_pretrained(folder / "vae"),
                 text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
                 tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                 unet=UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
                 scheduler=DDPMScheduler.from_pretrained(folder / "scheduler"))
    if family == "sd15":
        return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    return StableDiffusionXLPipeline(
        **parts, text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").eval(),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"))


def run_models(pipe, family, encoders):
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([20, 800])
    context = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    extra = {}
    if family == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g),
                                      "time_ids": torch.randn(2, 6, generator=g)}
    ids = torch.randint(2, 40, (2, 77), generator=g)
    with torch.no_grad():
        return [pipe.unet(x, t, context, **extra).sample] + [te(ids).last_hidden_state for te in encoders]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_saved_file_loads_in_diffusers_with_the_same_effect(tmp_path, family):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from trainer.adapters.targets import text_encoder_targets, unet_targets
    from trainer.demo.tiny_models import build_tiny_pipeline

    pipe = load_pipeline(build_tiny_pipeline(tmp_path / "model", family), family)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    prefixes = ["lora_te"] if family == "sd15" else ["lora_te1", "lora_te2"]
    targets = unet_targets(pipe.unet, family, "full")  # superset of the default preset, plus 3x3 LoCon convs
    for encoder, prefix in zip(encoders, prefixes):
        targets += text_encoder_targets(encoder, prefix)
    network = LoRANetwork(targets, NetworkConfig(rank=4, alpha=2, targets="full", conv_rank=2, conv_alpha=3))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lora in network.lora_modules().values():
            for p in (lora.lora_down.weight, lora.lora_up.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    base = run_models(pipe, family, encoders)
    with network.attached():
        ours = run_models(pipe, family, encoders)
    for a, b in zip(base, ours):
        assert (a - b).abs().max() > 1e-2  # every model is visibly changed by the adapters

    path = save_lora(tmp_path / "lora.safetensors", network.kohya_state_dict(),
                     build_metadata(TrainConfig(), family, "epsilon", 512), dtype="fp32")
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(handler)
    try:
        pipe.load_lora_weights(str(path))
    finally:
        diffusers_logger.removeHandler(handler)
    assert warnings == []  # no unexpected / missing keys reported

    theirs = run_models(pipe, family, encoders)
    for model, a, b in zip(["unet", *prefixes], ours, theirs):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=f"{model} output differs")
    counts = {c: sum(1 for t in targets if t.component == c) for c in ("unet", "te", "te1", "te2")}
    assert sum(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules()) == counts["unet"]
    loaded_te = [sum(isinstance(m, BaseTunerLayer) for m in te.modules()) for te in encoders]
    assert loaded_te == ([counts["te"]] if family == "sd15" else [counts["te1"], counts["te2"]])


def small_state_dict():
    torch.manual_seed(0)
    return {"lora_unet_a.lora_down.weight": torch.randn(4, 8), "lora_unet_a.lora_up.weight": torch.randn(6, 4),
            "lora_unet_a.alpha": torch.tensor(2.0), "lora_unet_c.lora_down.weight": torch.randn(2, 3, 3, 3),
            "lora_unet_c.lora_up.weight": torch.randn(5, 2, 1, 1), "lora_unet_c.alpha": torch.tensor(1.0)}


def full_config():
    return TrainConfig(steps=1200, batch_size=2, seed=7, mixed_precision="bf16", gradient_checkpointing=True,
                       network=NetworkConfig(rank=8, alpha=4, targets="full", conv_rank=4, conv_alpha=2,
                                             train_text_encoder=True),
                       optimizer=OptimizerConfig(learning_rate=2e-4, text_encoder_lr=5e-5, warmup_steps=50),
                       objective=ObjectiveConfig(min_snr_gamma=5.0, noise_offset=0.05, loss="huber"))


def test_metadata_is_kohya_compatible_strings_with_our_config():
    config = full_config()
    meta = build_metadata(config, "sdxl", "v", (1024, 768), title="my style", trigger_phrase="ohwx style",
                          notes="test run", extra={"ss_num_train_images": 12, "custom": {"a": 1}},
                          steps=1000, started_at=1_700_000_000, finished_at=1_700_003_600,
                          bucket_info={"buckets": {"0": {"resolution": [1024, 768], "count": 12}}},
                          tag_frequency={"img": {"ohwx": 12}})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    expected = {
        "ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4",
        "ss_base_model_version": "sdxl_base_v1-0", "ss_learning_rate": "0.0002", "ss_unet_lr": "0.0002",
        "ss_text_encoder_lr": "5e-05", "ss_lr_scheduler": "constant_with_warmup", "ss_lr_warmup_steps": "50",
        "ss_gradient_accumulation_steps": "1", "ss_gradient_checkpointing": "True", "ss_mixed_precision": "bf16",
        "ss_steps": "1000", "ss_max_train_steps": "1200", "ss_seed": "7", "ss_min_snr_gamma": "5.0",
        "ss_noise_offset": "0.05", "ss_loss_type": "huber", "ss_training_started_at": "1700000000.0",
        "ss_training_finished_at": "1700003600.0", "ss_num_train_images": "12",
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": "my style", "modelspec.resolution": "1024x768", "modelspec.prediction_type": "v",
        "modelspec.trigger_phrase": "ohwx style", "modelspec.description": "test run", "custom": '{"a": 1}',
    }
    assert {k: meta.get(k) for k in expected} == expected
    assert json.loads(meta["ss_network_args"]) == {"targets": "full", "conv_dim": "4", "conv_alpha": "2"}
    assert json.loads(meta["ss_bucket_info"])["buckets"]["0"]["count"] == 12
    assert json.loads(meta["ss_tag_frequency"]) == {"img": {"ohwx": 12}}
    assert meta["modelspec.date"].startswith("2023-11-1")
    assert float(meta["ss_max_grad_norm"]) == 1.0 and "ss_optimizer" in meta
    assert TrainConfig.from_dict(json.loads(meta["loralab_config"])) == config

    plain = build_metadata(TrainConfig(), "sd15", "epsilon", 512)
    assert plain["ss_base_model_version"] == "sd_v1" and plain["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert plain["modelspec.prediction_type"] == "epsilon" and plain["modelspec.resolution"] == "512x512"
    assert plain["ss_loss_type"] == "l2" and plain["ss_min_snr_gamma"] == "None" and plain["ss_text_encoder_lr"] == "0.0"
    assert json.loads(plain["ss_network_args"]) == {"targets": "transformer"}
    assert "ss_training_started_at" not in plain and "modelspec.trigger_phrase" not in plain


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                                 ("fp32", torch.float32)])
def test_save_converts_weights_and_keeps_alpha_exact(tmp_path, dtype, torch_dtype):
    sd = small_state_dict()
    path = save_lora(tmp_path / "x.safetensors", sd, {"ss_network_dim": 4, "note": "hi"}, dtype=dtype)
    loaded, meta = load_lora(path)
    assert loaded.keys() == sd.keys()
    for key, value in loaded.items():
        if key.endswith(".alpha"):
            assert value.dtype == torch.float32 and value.shape == () and value.item() == sd[key].item()
        else:
            assert value.dtype == torch_dtype and value.shape == sd[key].shape
            torch.testing.assert_close(value.float(), sd[key], atol=1e-2, rtol=1e-2)
    assert meta["ss_network_dim"] == "4" and meta["note"] == "hi"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # no temp file left behind


def test_hashes_match_kohya_and_ignore_user_metadata(tmp_path):
    sd = small_state_dict()
    a = load_lora(save_lora(tmp_path / "a.safetensors", sd, {"ss_seed": "1", "modelspec.title": "A"}))[1]
    b = load_lora(save_lora(tmp_path / "b.safetensors", sd, {"ss_seed": "1", "modelspec.title": "B"}))[1]
    c = load_lora(save_lora(tmp_path / "c.safetensors", sd, {"ss_seed": "2"}))[1]
    assert a["sshs_model_hash"] == b["sshs_model_hash"] and len(a["sshs_legacy_hash"]) == 8
    assert a["sshs_model_hash"] == c["sshs_model_hash"]  # the model hash covers the tensors only
    big = {**sd, "lora_unet_b.lora_down.weight": torch.randn(4, 100_000)}  # the legacy hash reads bytes 1M..1M+64K
    d = load_lora(save_lora(tmp_path / "d.safetensors", big, {"ss_seed": "1"}, dtype="fp32"))[1]
    assert d["sshs_legacy_hash"] != a["sshs_legacy_hash"] and len(d["sshs_legacy_hash"]) == 8
    # A1111's "addnet" hash of a file: sha256 of everything after the header. Tensors are the same, so it matches.
    data = (tmp_path / "a.safetensors").read_bytes()
    assert hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest() == a["sshs_model_hash"]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    import safetensors.torch

    path = save_lora(tmp_path / "x.safetensors", small_state_dict(), {})
    before = path.read_bytes()

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(LoRAFileError, match="x.safetensors.*disk full"):
        save_lora(path, {k: v * 2 for k, v in small_state_dict().items()}, {})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def test_unreadable_files_give_an_error_naming_the_file(tmp_path):
    path = save_lora(tmp_path / "ok.safetensors", small_state_dict(), {"ss_seed": "1"})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LoRAFileError, match="truncated.safetensors"):
        load_lora(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(LoRAFileError, match="garbage.safetensors"):
        load_lora(garbage)
    with pytest.raises(LoRAFileError, match="not found: .*missing.safetensors"):
        load_lora(tmp_path / "missing.safetensors")
    with pytest.raises(LoRAFileError, match="old.pt.*only .safetensors"):
        (tmp_path / "old.pt").write_bytes(b"x")
        load_lora(tmp_path / "old.pt")


def test_network_round_trip_through_a_file(tmp_path):
    from torch import nn

    from trainer.hosts.base import AdapterTarget

    targets = [AdapterTarget("lora_unet_l", nn.Linear(8, 6), "unet"),
               AdapterTarget("lora_unet_c", nn.Conv2d(3, 5, 3, padding=1), "unet")]
    network = LoRANetwork(targets, NetworkConfig(rank=2, alpha=1, targets="full"))
    with torch.no_grad():
        for p in network.parameters():
            p.normal_()
    path = save_lora(tmp_path / "n.safetensors", network.kohya_state_dict(), {}, dtype="fp32")
    other = LoRANetwork(targets, NetworkConfig(rank=2, alpha=1, targets="full"))
    other.load_kohya_state_dict(load_lora(path)[0])
    for name in ("lora_unet_l", "lora_unet_c"):
        assert torch.equal(other[name].delta_weight(), network[name].delta_weight())


def test_holds_same_lora_compares_weights_and_shown_metadata_not_the_date(tmp_path):
    from trainer.files.lora_file import holds_same_lora, save_lora

    tensors = {"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.alpha": torch.tensor(2.0)}
    meta = {"ss_steps": "4", "modelspec.title": "mine", "modelspec.date": "2025-01-01T00:00:00"}
    path = save_lora(tmp_path / "a.safetensors", tensors, meta, dtype="fp16")
    assert holds_same_lora(path, tensors, {**meta, "modelspec.date": "2026-01-01T00:00:00"}, dtype="fp16")
    assert not holds_same_lora(path, tensors, meta, dtype="fp32")  # other stored weights
    assert not holds_same_lora(path, {**tensors, "lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, meta)
    assert not holds_same_lora(path, tensors, {**meta, "modelspec.title": "other"}, dtype="fp16")
    assert not holds_same_lora(tmp_path / "missing.safetensors", tensors, meta)
