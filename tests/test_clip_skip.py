"""The diffusers host's clip_skip means what it means in ComfyUI's graph (no ComfyUI needed here; the comparison with
ComfyUI's own CLIP is tests/comfy/test_text_conditioning.py).

SD1.5: 1 = the last layer after the final LayerNorm (`last_hidden_state`), N = layer -N with that LayerNorm.
SDXL: 1 = 2 = the penultimate layer of both encoders, no LayerNorm, concatenated; N >= 3 = layer -N; pooled is
CLIP-G's projected output whatever clip_skip is.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from trainer.demo.tiny_models import text_encoder_config
from trainer.hosts.diffusers_host import DiffusersHost

CAPTIONS = ["a red cat, sitting", "sks dog"]


def reference(host):
    """Each encoder's transformers outputs for CAPTIONS, tokenized the way the host tokenizes."""
    outs = []
    for tokenizer, encoder in zip(host.tokenizers, host.encoders):
        ids = tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        outs.append(encoder(ids, output_hidden_states=True))
    return outs


def final_norm(encoder, state):
    return getattr(encoder, "text_model", encoder).final_layer_norm(state)


@pytest.fixture(scope="module")
def sdxl_four_layers(tiny_models, tmp_path_factory):
    """The tiny SDXL with 4-layer text encoders, so layer -3 is a real layer (not the embeddings)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = tmp_path_factory.mktemp("sdxl4") / "model"
    shutil.copytree(tiny_models("sdxl"), folder)
    torch.manual_seed(1)
    CLIPTextModel(text_encoder_config(layers=4)).save_pretrained(folder / "text_encoder")
    CLIPTextModelWithProjection(text_encoder_config(layers=4, projection=32)).save_pretrained(folder / "text_encoder_2")
    return DiffusersHost(folder)


@torch.no_grad()
def test_sd15_clip_skip_is_comfyui_last_layer_then_normed_layer_minus_n(tiny_models):
    host = DiffusersHost(tiny_models("sd15"))
    [out] = reference(host)
    encoder = host.encoders[0]

    context, pooled = host.text_forward(CAPTIONS, 1)
    torch.testing.assert_close(context, out.last_hidden_state)  # after the final LayerNorm, as ComfyUI encodes
    assert not torch.allclose(context, out.hidden_states[-1], atol=1e-3)  # the pre-LayerNorm state is not it
    assert pooled is None  # SD1.5 has no pooled conditioning

    context, _ = host.text_forward(CAPTIONS, 2)
    torch.testing.assert_close(context, final_norm(encoder, out.hidden_states[-2]))

    # The cached path (encode_text) gives the same conditioning as the trainable one.
    cached = host.encode_text(CAPTIONS, 1)
    torch.testing.assert_close(torch.stack([c["context"] for c in cached]), out.last_hidden_state)


@torch.no_grad()
def test_sdxl_clip_skip_1_and_2_are_the_penultimate_layer_and_3_is_layer_minus_3(sdxl_four_layers):
    host = sdxl_four_layers
    outs = reference(host)

    def concat(index):
        return torch.cat([o.hidden_states[index] for o in outs], dim=-1)  # CLIP-L first, no LayerNorm

    for clip_skip, index in ((1, -2), (2, -2), (3, -3)):
        context, pooled = host.text_forward(CAPTIONS, clip_skip)
        torch.testing.assert_close(context, concat(index), msg=lambda m: f"clip_skip {clip_skip}: {m}")
        torch.testing.assert_close(pooled, outs[1].text_embeds)  # CLIP-G's projection, unaffected by clip_skip
        cached = host.encode_text(CAPTIONS, clip_skip)
        torch.testing.assert_close(torch.stack([c["pooled"] for c in cached]), outs[1].text_embeds)
    assert not torch.allclose(concat(-2), concat(-3), atol=1e-3)


@torch.no_grad()
def test_clip_skip_beyond_the_encoder_depth_falls_back_to_the_normed_last_layer(tiny_models, sdxl_four_layers):
    """ComfyUI treats a Set Last Layer deeper than the encoder as 'last' (final LayerNorm applied), in both families."""
    host = DiffusersHost(tiny_models("sd15"))  # 2 text layers
    [out] = reference(host)
    torch.testing.assert_close(host.text_forward(CAPTIONS, 3)[0], out.last_hidden_state)

    outs = reference(sdxl_four_layers)  # 4 text layers
    context, _ = sdxl_four_layers.text_forward(CAPTIONS, 5)
    torch.testing.assert_close(context, torch.cat([o.last_hidden_state for o in outs], dim=-1))
