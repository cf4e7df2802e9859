"""Tiny random-weight SD1.5- and SDXL-shaped diffusers models, built in-process from configs.

They have the same module *structure* as the real models (cross-attention down/up blocks, SDXL's text-time
embedding and two text encoders, an 8x VAE), so naming, conditioning and the training loop are exercised for real,
but they are small enough to train on the CPU in seconds. Used by `python -m trainer demo`, the tests and the
benchmarks. No hub, no network: the tokenizer vocabulary is generated here too.
"""
from __future__ import annotations

import json
from pathlib import Path

TOKENIZER_MAX_LENGTH = 77
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-()"


def write_char_tokenizer(folder: Path) -> None:
    """A character-level CLIP tokenizer (vocab + empty merges): real CLIPTokenizer code, no download."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(CHARS) + [c + "</w>" for c in CHARS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": TOKENIZER_MAX_LENGTH, "tokenizer_class": "CLIPTokenizer",
                    "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}),
        encoding="utf-8",
    )


def vocab_size() -> int:
    return 2 + 2 * len(CHARS)


def text_encoder_config(hidden: int = 32, layers: int = 2, projection: int | None = None):
    from transformers import CLIPTextConfig

    kwargs = dict(
        vocab_size=vocab_size(), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=TOKENIZER_MAX_LENGTH, bos_token_id=0, eos_token_id=1,
        pad_token_id=1, hidden_act="quick_gelu",
    )
    if projection:
        kwargs["projection_dim"] = projection
    return CLIPTextConfig(**kwargs)


def unet_config(family: str) -> dict:
    """UNet2DConditionModel kwargs. SD1.5 shape: conv proj_in/out, cross-attn in the first levels.
    SDXL shape: no attention in the first level, linear proj_in/out, text_time embedding, 2 layers per block."""
    if family == "sd15":
        return dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
        )
    if family == "sdxl":
        te_width = 32 + 32  # SDXL concatenates both encoders' hidden states (768 + 1280 in the real model)
        return dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2), cross_attention_dim=te_width, attention_head_dim=(4, 8),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8,
        )
    raise ValueError(f"unknown tiny model family '{family}' (use 'sd15' or 'sdxl')")


def vae_config() -> dict:
    # Four blocks -> 8x downsampling like the real SD VAE; narrow channels keep it fast.
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, sample_size=64,
    )


def scheduler_config(prediction: str) -> dict:
    return {
        "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "prediction_type": prediction, "clip_sample": False,
    }


def build_tiny_pipeline(folder: str | Path, family: str = "sd15", prediction: str = "epsilon", seed: int = 0) -> Path:
    """Write a diffusers-layout model folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/ ...)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(family))
    # Random init of the output layers: diffusers zero-initialises some, which would make a LoRA's effect invisible.
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.02)
    unet.save_pretrained(folder / "unet")
    AutoencoderKL(**vae_config()).save_pretrained(folder / "vae")
    CLIPTextModel(text_encoder_config()).save_pretrained(folder / "text_encoder")
    write_char_tokenizer(folder / "tokenizer")
    components = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                  "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                  "scheduler": ["diffusers", "DDPMScheduler"]}
    if family == "sdxl":
        CLIPTextModelWithProjection(text_encoder_config(projection=32)).save_pretrained(folder / "text_encoder_2")
        write_char_tokenizer(folder / "tokenizer_2")
        components["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
        components["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(prediction)))
    pipeline_class = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class, **components}, indent=1))
    return folder
