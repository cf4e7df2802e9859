"""Both hosts condition the UNet on what ComfyUI's inference graph produces, for the same text-encoder weights.

ComfyUI's tiny CLIP-L / CLIP-G weights are converted into a diffusers-layout folder (transformers CLIPTextModel /
CLIPTextModelWithProjection, ComfyUI's own tokenizer files) and the real DiffusersHost text path is compared with
ComfyUI's CLIP Set Last Layer + CLIP Text Encode path: clip_skip 1 = no Set Last Layer node, N >= 2 = layer -N.
"""
from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.comfy

TE_LAYERS = 3
CAPTIONS = ["a photo of a red cat, sitting on a mat", "sks dog"]
# Both compute in fp32 from the same fp16 weights; only kernel differences remain (about 2e-6 seen, values ~1).
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture
def pack(loralab_pack):
    return lambda name: importlib.import_module(f"loralab_pack.{name}")


def comfy_reference(clip, caption: str, clip_skip: int):
    """(cond (77, W), pooled) exactly as ComfyUI's nodes compute them (CLIPSetLastLayer, CLIPTextEncode)."""
    if clip_skip > 1:
        clip = clip.clone()
        clip.clip_layer(-clip_skip)
    [[cond, extra]] = clip.encode_from_tokens_scheduled(clip.tokenize(caption))
    return cond[0], extra["pooled_output"][0]


def to_transformers(sd_clip, config_file: Path, projection: bool, dtype=torch.float16):
    """A transformers text model holding exactly the weights of one of ComfyUI's SDClipModel encoders (fp16, as
    ComfyUI keeps them on the CPU; the host computes in fp32 like ComfyUI does)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    fields = json.loads(config_file.read_text())  # ComfyUI's own config for this encoder, at the loaded depth
    fields["num_hidden_layers"] = sd_clip.num_layers
    config = CLIPTextConfig(**{k: v for k, v in fields.items() if k not in ("architectures", "torch_dtype")})
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).to(dtype)
    own = model.state_dict().keys()  # transformers 5's CLIPTextModel has no `text_model.` level
    weights = {(k if k in own else k.removeprefix("text_model.")): v.to(dtype)
               for k, v in sd_clip.transformer.state_dict().items()}
    if not projection:
        weights.pop("text_projection.weight")  # CLIPTextModel has none (and SD1.5's is uninitialised in ComfyUI)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model


def write_tokenizer(comfy_path: Path, folder: Path, pad_token: str | None = None) -> None:
    """ComfyUI's own tokenizer files, unchanged except the pad token (SDXL's tokenizer_2 pads with "!")."""
    shutil.copytree(comfy_path / "comfy" / "sd1_tokenizer", folder)
    if pad_token is not None:  # both files name it; transformers reads special_tokens_map.json last
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            fields = json.loads((folder / name).read_text())
            fields["pad_token"] = pad_token
            (folder / name).write_text(json.dumps(fields, indent=1))


def diffusers_folder(pack, comfy, clip, kind: str, root: Path) -> Path:
    """A DiffusersHost folder: tiny unet/vae/scheduler, ComfyUI's text encoder(s) and tokenizers."""
    folder = pack("trainer.demo.tiny_models").build_tiny_pipeline(root / kind, kind)
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.rmtree(folder / sub, ignore_errors=True)
    model, configs = clip.cond_stage_model, comfy.path / "comfy"
    to_transformers(model.clip_l, configs / "sd1_clip_config.json", projection=False).save_pretrained(
        folder / "text_encoder")
    write_tokenizer(comfy.path, folder / "tokenizer")
    if kind == "sdxl":
        to_transformers(model.clip_g, configs / "clip_config_bigg.json", projection=True).save_pretrained(
            folder / "text_encoder_2")
        write_tokenizer(comfy.path, folder / "tokenizer_2", pad_token="!")
    return folder


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_both_hosts_give_comfyui_inference_conditioning(kind, comfy, tiny_models, pack, tmp_path):
    model, clip, _vae = tiny_models(kind, te_layers=TE_LAYERS)
    host = pack("trainer.hosts.diffusers_host").DiffusersHost(diffusers_folder(pack, comfy, clip, kind, tmp_path))
    comfy_host = pack("nodes.comfy_host").ComfyHost(model, clip)
    assert host.family == comfy_host.family == kind

    # Identical token ids, padding included (CLIP-L pads with the end token, CLIP-G with id 0).
    tokens = clip.tokenize(CAPTIONS[0])
    for key, tokenizer in zip(["l", "g"], host.tokenizers):
        ids = tokenizer(CAPTIONS[0], padding="max_length", max_length=77).input_ids
        assert ids == [t for t, _w in tokens[key][0]], key

    # 1 (default) and 2 (the usual skip); 3: a layer no default uses; 4 > depth: ComfyUI falls back to the last layer.
    for clip_skip in (1, 2, 3, TE_LAYERS + 1):
        with torch.no_grad():
            context, pooled = host.text_forward(CAPTIONS, clip_skip)
            comfy_context, comfy_pooled = comfy_host.text_forward(CAPTIONS, clip_skip)  # text-encoder training
        cached = host.encode_text(CAPTIONS, clip_skip)  # the cached path of both hosts
        ours = comfy_host.encode_text(CAPTIONS, clip_skip)
        for i, caption in enumerate(CAPTIONS):
            cond, ref_pooled = comfy_reference(clip, caption, clip_skip)
            where = f"{kind} clip_skip={clip_skip} caption {i}"
            torch.testing.assert_close(context[i].float(), cond.float(), **TOLERANCE, msg=lambda m: f"{where}: {m}")
            torch.testing.assert_close(cached[i]["context"], cond.float(), **TOLERANCE)
            torch.testing.assert_close(ours[i]["context"], cond.float(), rtol=0, atol=0)
            torch.testing.assert_close(comfy_context[i].float(), cond.float(), rtol=0, atol=0)
            if kind == "sdxl":
                torch.testing.assert_close(pooled[i].float(), ref_pooled.float(), **TOLERANCE,
                                           msg=lambda m: f"{where} pooled: {m}")
                torch.testing.assert_close(ours[i]["pooled"], ref_pooled.float(), rtol=0, atol=0)
                torch.testing.assert_close(comfy_pooled[i].float(), ref_pooled.float(), rtol=0, atol=0)
            else:
                assert pooled is None and "pooled" not in cached[i] and "pooled" not in ours[i]
