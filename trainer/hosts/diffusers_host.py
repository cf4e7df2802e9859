"""The diffusers host: the engine's host interface over a local diffusers model folder.

It serves the headless CLI and lets the tests run the whole engine on tiny random models without ComfyUI.
Folder layout: unet/, vae/, text_encoder/, tokenizer/ (+ text_encoder_2/, tokenizer_2/ for SDXL), scheduler/.

Text conditioning is defined by what ComfyUI feeds the UNet at inference, so a LoRA trained here sees the same
context as one trained by the ComfyUI host (see `context_layer`). The tokenizers' own padding is used: a diffusers
SDXL folder's tokenizer_2 pads with "!" (id 0), which is ComfyUI's CLIP-G rule; CLIP-L pads with the end token.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Sequence

import torch

from ..errors import TrainingError
from ..training.identity import module_fingerprint
from ..training.schedules import DiscreteSchedule
from .base import AdapterTarget, Conditioning, MemoryInfo
from .refusals import input_channels_refusal, sd2_refusal

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}


class DiffusersHost:
    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 interrupt=None):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        folder = Path(folder)
        if not (folder / "unet").is_dir():
            raise TrainingError(f"model folder '{folder}' has no unet/ sub-folder: give a diffusers-layout model folder")
        _refuse_unsupported(folder)  # from the config files, before gigabytes of weights load
        self.folder = folder
        self.device = torch.device(device)
        self.dtype = dtype
        self._interrupt = interrupt
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet").to(self.device, dtype).requires_grad_(False)
        self.vae = AutoencoderKL.from_pretrained(folder / "vae").to(self.device, dtype).requires_grad_(False)
        self.tokenizers = [CLIPTokenizer.from_pretrained(folder / "tokenizer")]
        self.encoders = [CLIPTextModel.from_pretrained(folder / "text_encoder").to(self.device, dtype)]
        if (folder / "text_encoder_2").is_dir():
            self.family = "sdxl"
            self.tokenizers.append(CLIPTokenizer.from_pretrained(folder / "tokenizer_2"))
            self.encoders.append(
                CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").to(self.device, dtype)
            )
        else:
            self.family = "sd15"
        for encoder in self.encoders:
            encoder.requires_grad_(False).eval()
        self.unet.eval()
        self.vae.eval()
        self.schedule = _schedule_from_folder(folder / "scheduler")
        self.latent_channels = self.unet.config.in_channels
        self.context_width = self.unet.config.cross_attention_dim
        self._scaling = float(self.vae.config.scaling_factor)
        self._shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.image_encoder_id = module_fingerprint(self.vae, "diffusers-vae")
        # The tag names the layer rule: text embeddings cached under the old rule must not be reused.
        self.text_encoder_id = "+".join(module_fingerprint(e, "diffusers-te/comfy-layers") for e in self.encoders)
        self.model_id = module_fingerprint(self.unet, "diffusers-unet")

    # --- modules -------------------------------------------------------------------------------------------
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        names = ["te"] if self.family == "sd15" else ["te1", "te2"]
        return dict(zip(names, self.encoders))

    def adapter_targets(self, target_set: str, conv: bool, text_encoder: bool) -> list[AdapterTarget]:
        from ..adapters.targets import all_text_encoder_targets, unet_targets

        targets = unet_targets(self.unet, self.family, target_set, scheme="diffusers")
        if text_encoder:
            targets += all_text_encoder_targets(self.text_encoders())
        return targets

    @contextlib.contextmanager
    def gradient_checkpointing(self, enabled: bool):
        """Turn on diffusers' own checkpointing for the run and restore the model's flag afterwards."""
        before = bool(getattr(self.unet, "is_gradient_checkpointing", False))
        if enabled and not before:
            self.unet.enable_gradient_checkpointing()
        try:
            yield
        finally:
            if enabled and not before:
                self.unet.disable_gradient_checkpointing()

    @contextlib.contextmanager
    def training_session(self, keep_text_encoder: bool = False, train_text_encoder: bool = False):
        """Nothing to load or swap: the diffusers models are ordinary modules, resident on ``self.device``."""
        yield

    # --- the denoiser ----------------------------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        added = None
        if self.family == "sdxl":
            added = {"text_embeds": cond.pooled, "time_ids": cond.size_ids}
        return self.unet(noisy, timesteps, encoder_hidden_states=cond.context, added_cond_kwargs=added).sample

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self._shift) * self._scaling

    # --- encoders ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.permute(0, 3, 1, 2).to(self.device, self.dtype) * 2 - 1
        return self.vae.encode(pixels).latent_dist.mean.float().cpu()

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str], clip_skip: int = 1) -> list[dict[str, torch.Tensor]]:
        context, pooled = self.text_forward(captions, clip_skip)
        out = []
        for i in range(len(captions)):
            item = {"context": context[i].float().cpu()}
            if pooled is not None:
                item["pooled"] = pooled[i].float().cpu()
            out.append(item)
        return out

    def text_forward(self, captions: Sequence[str], clip_skip: int = 1):
        """(context, pooled) on the device, with autograd (text-encoder training calls this directly).

        clip_skip means what it means in ComfyUI's graph: 1 is what CLIP Text Encode gives with no "CLIP Set Last
        Layer" node, N >= 2 is "CLIP Set Last Layer" at -N (see `context_layer`). SDXL: both encoders' states are
        concatenated (CLIP-L first); pooled = CLIP-G's projected pooled output, which no clip_skip changes.
        """
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            # 77 = the encoder's positions; ComfyUI's own tokenizer files say model_max_length 8192.
            ids = tokenizer(list(captions), padding="max_length", max_length=encoder.config.max_position_embeddings,
                            truncation=True, return_tensors="pt").input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            index, norm = context_layer(self.family, clip_skip, encoder.config.num_hidden_layers)
            state = out.hidden_states[index]
            if norm:
                state = getattr(encoder, "text_model", encoder).final_layer_norm(state)
            hidden.append(state)
            if self.family == "sdxl" and hasattr(out, "text_embeds"):
                pooled = out.text_embeds
        return torch.cat(hidden, dim=-1), pooled

    # --- services ---------------------------------------------------------------------------------------------
    def memory(self) -> MemoryInfo:
        from ..monitor.events import memory_snapshot

        snap = memory_snapshot(self.device)
        return MemoryInfo(**{k: snap[k] for k in ("device", "allocated", "reserved", "peak", "total")},
                          free=int(snap.get("free", snap["total"] - snap["allocated"])))

    def check_interrupt(self) -> None:
        if self._interrupt is not None:
            self._interrupt()


def context_layer(family: str, clip_skip: int, num_layers: int) -> tuple[int, bool]:
    """(index into a transformers CLIP's `hidden_states`, apply the final LayerNorm?) for one text encoder.

    Mirrors ComfyUI (comfy/sd1_clip.py, sdxl_clip.py): its layer -N is transformers' `hidden_states[-N]` (that
    tuple starts with the embeddings). SD1.5 encodes the last layer by default and applies the final LayerNorm to
    any layer; SDXL encodes layer -2 of both encoders by default, without the LayerNorm, so clip_skip 1 and 2 are the
    same. A layer beyond the encoder's depth makes ComfyUI fall back to the normed last layer.
    """
    if family == "sdxl" and clip_skip <= 2:
        return -2, False
    if clip_skip > num_layers:
        return -1, True
    return -clip_skip, family == "sd15"


def _schedule_from_folder(folder: Path) -> DiscreteSchedule:
    config = json.loads((folder / "scheduler_config.json").read_text()) if folder.is_dir() else {}
    prediction = PREDICTIONS.get(config.get("prediction_type", "epsilon"))
    if prediction is None:
        raise TrainingError(f"{folder}: prediction_type '{config.get('prediction_type')}' is not supported "
                            f"(choose one of {', '.join(PREDICTIONS)})")
    return DiscreteSchedule.from_betas(
        beta_start=config.get("beta_start", 0.00085), beta_end=config.get("beta_end", 0.012),
        schedule=config.get("beta_schedule", "scaled_linear"), num=config.get("num_train_timesteps", 1000),
        prediction=prediction,
    )


LOAD_INSTEAD = "set 'model' to the diffusers folder of an SD1.5 or SDXL model"


def _refuse_unsupported(folder: Path) -> None:
    """Refuse, by name, folders the family test in ``DiffusersHost.__init__`` would take for SD1.5 (or SDXL).

    SD2.x has SD1.5's layout (one text encoder, 4-channel latents); what gives it away is the UNet's 1024-wide
    cross-attention (OpenCLIP ViT-H; SD1.5 is 768, SDXL 2048 with two encoders). Inpainting / instruct-pix2pix UNets
    take extra input channels that training cannot supply (a shape error in the first step otherwise).
    """
    unet = _config_file(folder / "unet" / "config.json")
    latent_channels = int(_config_file(folder / "vae" / "config.json").get("latent_channels", 4))
    in_channels = int(unet.get("in_channels", latent_channels))
    two_encoders = (folder / "text_encoder_2").is_dir()
    pipeline = _config_file(folder / "model_index.json").get("_class_name") or "diffusers folder"
    if not two_encoders and unet.get("cross_attention_dim") == 1024:
        variant = [pipeline, "1024-wide cross-attention with one text encoder"]
        if _config_file(folder / "scheduler" / "scheduler_config.json").get("prediction_type") == "v_prediction":
            variant.append("v-prediction")
        if in_channels != latent_channels:
            variant.append(f"{in_channels}-channel UNet input")
        raise sd2_refusal(", ".join(variant), LOAD_INSTEAD)
    if in_channels != latent_channels:
        # diffusers' conventions: inpainting concatenates mask (1) + masked-image latents, pix2pix the image latents
        kind = {2 * latent_channels + 1: "inpainting", 2 * latent_channels: "instruct-pix2pix"}.get(in_channels)
        family = "SDXL" if two_encoders else "SD1.5"
        raise input_channels_refusal(in_channels, latent_channels, kind, pipeline, LOAD_INSTEAD, family)


def _config_file(path: Path) -> dict:
    """A diffusers JSON config, or {} when absent (from_pretrained then reports the missing file itself)."""
    return json.loads(path.read_text()) if path.is_file() else {}
