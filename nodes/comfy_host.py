"""The ComfyUI host: the engine's host interface over ComfyUI's loaded MODEL (ModelPatcher), CLIP and VAE.

Training calls the diffusion model directly with per-sample conditioning (never through the sampler/guider,
which would average captions over the batch) and trains on the model's own output parameterization.
The input MODEL and CLIP are never changed: adapters are forward hooks, gradient checkpointing wraps `forward` of the
UNet's layers and text-encoder training wraps `forward` of the CLIP's LayerNorms, for the run only; all are removed in
`finally`.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from ..trainer.errors import TrainingError, TrainingInterrupted
from ..trainer.hosts.base import AdapterTarget, Conditioning, MemoryInfo
from ..trainer.hosts.refusals import input_channels_refusal, sd2_refusal
from ..trainer.families import config_value
from ..trainer.training.identity import module_fingerprint
from .identity import model_fingerprint
from .sampling import schedule_from_sampling


class ComfyHost:
    def __init__(self, model, clip=None, vae=None):
        import comfy.model_management as mm

        self.mm = mm
        self.patcher = model
        self.base = model.model
        self.unet = self.base.diffusion_model
        self.clip = clip
        self.vae = vae
        self.device = mm.get_torch_device()
        self.dtype = self.base.manual_cast_dtype or self.base.get_dtype()
        self.family_spec = detect_family(self.base)
        self.family = self.family_spec.name
        self.is_dit = not self.family_spec.is_unet
        self.per_sample_conditioning = self.is_dit  # the loop hands predict each sample's text entry
        self.sampling = model.get_model_object("model_sampling")
        self.schedule = schedule_from_sampling(self.sampling, self.family_spec)
        self.latent_channels = self.base.latent_format.latent_channels
        self.latent_dims = int(getattr(self.base.latent_format, "latent_dimensions", 2))
        unet_config = self.base.model_config.unet_config
        self.context_width = config_value(unet_config, self.family_spec.context_key) or 0
        self.pooled_width = config_value(unet_config, self.family_spec.pooled_key) if self.is_dit else None
        self.model_id = model_fingerprint(model, self.unet, "diffusion_model.", "comfy-unet")
        self.image_encoder_id = vae_encoder(vae)[1] if vae is not None else ""
        self.text_encoder_id = (model_fingerprint(clip.patcher, clip.cond_stage_model, "", "comfy-clip")
                                if clip is not None else "")

    # --- modules -------------------------------------------------------------------------------------------
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The trainable text encoders by component (SD1.5/SDXL only: T5, Qwen, Gemma and UMT5 are not trained)."""
        if self.clip is None or self.is_dit:
            return {}
        model = self.clip.cond_stage_model
        if self.family == "sd15":
            return {"te": model.clip_l.transformer}
        return {"te1": model.clip_l.transformer, "te2": model.clip_g.transformer}

    def adapter_targets(self, target_set: str, conv: bool, text_encoder: bool) -> list[AdapterTarget]:
        from ..trainer.adapters.targets import dit_targets, unet_targets

        if self.is_dit:
            if text_encoder:
                raise TrainingError(f"train_text_encoder is on, but LoRA Lab trains the text encoders of SD1.5 and "
                                    f"SDXL only, not {self.family_spec.title}'s: turn train_text_encoder off")
            return dit_targets(self.unet, self.family_spec, target_set)
        ldm_to_diffusers = None
        if self.family == "sd15":  # kohya names SD1.5 modules by their diffusers paths
            import comfy.utils

            mapping = comfy.utils.unet_to_diffusers(self.base.model_config.unet_config)
            ldm_to_diffusers = {ldm[: -len(".weight")]: diff[: -len(".weight")]
                                for diff, ldm in mapping.items() if diff.endswith(".weight")}
        targets = unet_targets(self.unet, self.family, target_set, scheme="ldm", ldm_to_diffusers=ldm_to_diffusers)
        if text_encoder:
            from ..trainer.adapters.targets import all_text_encoder_targets

            if self.clip is None:
                raise TrainingError("train_text_encoder is on but no CLIP is connected to Train LoRA")
            targets += all_text_encoder_targets(self.text_encoders())
        return targets

    @contextlib.contextmanager
    def gradient_checkpointing(self, enabled: bool):
        """Recompute each UNet layer in backward instead of keeping its activations; undone afterwards.

        ComfyUI's UNet iterates over the layers inside each block itself (`forward_timestep_embed`), so the layers
        (ResBlock, SpatialTransformer, Down/Upsample) are what gets wrapped, not the blocks. The very last layer is
        left alone: its recomputation would happen first thing in backward, saving no memory.
        """
        if not enabled:
            yield
            return
        if self.is_dit:
            from .dit import checkpointed_blocks

            with checkpointed_blocks(self.unet, self.family_spec.blocks):
                yield
            return
        from torch.utils.checkpoint import checkpoint

        blocks = list(self.unet.input_blocks) + [self.unet.middle_block] + list(self.unet.output_blocks)
        layers = [layer for block in blocks for layer in block][:-1]
        try:
            for layer in layers:
                original = layer.forward

                def forward(*args, _original=original, **kwargs):
                    if not torch.is_grad_enabled():
                        return _original(*args, **kwargs)
                    return checkpoint(_original, *args, use_reentrant=False, **kwargs)

                layer.forward = forward  # an instance attribute: deleting it restores the class method
            yield
        finally:
            for layer in layers:
                layer.__dict__.pop("forward", None)

    @contextlib.contextmanager
    def training_session(self, keep_text_encoder: bool = False, train_text_encoder: bool = False):
        """Load the model for training, evicting every other model first; undo everything on exit.

        The text encoder stays loaded only when captions are encoded during training. Weights ComfyUI created under
        inference mode (a checkpoint loaded on the CPU or with --gpu-only, so no device move re-creates them) cannot
        take part in autograd, so for the run they are swapped for ordinary tensors over the *same memory* (no
        second copy of the UNet; see `_ordinary_alias`); the original tensor objects are put back afterwards.
        """
        if getattr(self, "_session_active", False):  # re-entered (the estimate and the loop share one session)
            yield
            return
        self._session_active = True
        # Newer ComfyUI versions read this flag in model code to avoid in-place and inference-only fused kernels
        # during training (it does not exist in every version; setting it where it does is what makes them safe).
        was_training = getattr(self.mm, "in_training", None)
        self._keep_text_encoder = keep_text_encoder and self.clip is not None
        encoders = list(self.text_encoders().values()) if train_text_encoder else []
        swapped, frozen, norms = [], [], []
        try:
            if was_training is not None:
                self.mm.in_training = True
            self.mm.unload_all_models()
            self._refuse_partial_load()
            self.reload()
            with torch.inference_mode(False):
                for root in [self.unet] + encoders:
                    for module in root.modules():
                        for name, param in list(module._parameters.items()):
                            if param is not None and param.is_inference():
                                module._parameters[name] = torch.nn.Parameter(_ordinary_alias(param),
                                                                              requires_grad=False)
                                swapped.append((module, name, param))
                # ComfyUI leaves requires_grad on for weights it loads with load_state_dict: backward would then
                # compute (and keep) a gradient for every frozen weight, a second model in memory, and fail on fp8.
                for root in [self.unet] + encoders:
                    for param in root.parameters():
                        if param.requires_grad:
                            param.requires_grad_(False)
                            frozen.append(param)
            # Flux / Chroma blocks add residuals in place, like CLIP's layers: their LayerNorms get copies too
            norms = _norms_on_copies(encoders + ([self.unet] if self.family_spec.inplace_residuals else []))
            yield
        finally:
            for param in frozen:
                param.requires_grad_(True)
            for module in norms:
                module.__dict__.pop("forward", None)  # the class's forward again
            for module, name, param in swapped:
                module._parameters[name] = param
            if was_training is not None:
                self.mm.in_training = was_training
            self._session_active = False

    def _refuse_partial_load(self) -> None:
        """Training needs every weight on the device. When they do not fit, ComfyUI would load the model partially
        (low-VRAM offloading: frozen weights streamed in per layer), a path training here does not support yet (it
        is untested without a GPU): refuse with the ways out instead of an out-of-memory error mid-step."""
        if self.device.type == "cpu":
            return
        need = int(self.patcher.model_size())
        if getattr(self, "_keep_text_encoder", False):
            need += int(self.clip.patcher.model_size())
        free = int(self.mm.get_free_memory(self.device))
        if need > free:
            gib = 1024 ** 3
            raise TrainingError(
                f"the {self.family_spec.title} weights need {need / gib:.1f} GiB but only {free / gib:.1f} GiB of "
                f"{self.device} is free, so ComfyUI would load the model partially (low-VRAM offloading), which "
                "LoRA Lab cannot train on yet. Load it with weight_dtype fp8_e4m3fn (Load Diffusion Model) to halve "
                "it, close other programs using the GPU, or use a GPU with more memory")

    def reload(self) -> None:
        """(Re)load the model fully on the device, e.g. after a preview loaded the VAE next to it."""
        models = [self.patcher] + ([self.clip.patcher] if getattr(self, "_keep_text_encoder", False) else [])
        with torch.inference_mode(False):  # weights moved to the device here are ordinary tensors
            self.mm.load_models_gpu(models, force_full_load=True)

    # --- the denoiser ----------------------------------------------------------------------------------------
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if self.is_dit:  # timesteps are sigmas; ComfyUI's own conditioning and call (nodes/dit.py)
            from .dit import predict, rows_as_items

            items = cond.samples if cond.samples is not None else rows_as_items(cond, noisy.shape[0])
            return predict(self, noisy, timesteps, items)
        t = timesteps.float()  # discrete schedules: the model takes the timestep index (ms.timestep(sigma))
        y = self._adm(cond, noisy) if self.family == "sdxl" else None
        return self.unet(noisy, t, context=cond.context, y=y, control=None, transformer_options={})

    def _adm(self, cond: Conditioning, noisy: torch.Tensor) -> torch.Tensor:
        """SDXL's `y`: pooled text + embedded original size, crop and target size, each sample its own."""
        rows = []
        for i in range(noisy.shape[0]):
            oh, ow, top, left, th, tw = (int(v) for v in cond.size_ids[i].tolist())
            rows.append(self.base.encode_adm(pooled_output=cond.pooled[i:i + 1], height=oh, width=ow, crop_h=top,
                                             crop_w=left, target_height=th, target_width=tw, device=noisy.device))
        return torch.cat(rows).to(noisy.device, noisy.dtype)

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.latent_dims == 3 and latents.ndim == 4:  # Wan / Qwen-Image take (B, C, frames, H, W): one frame
            latents = latents.unsqueeze(2)
        return self.base.latent_format.process_in(latents)

    # --- encoders ---------------------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return vae_encoder(self.vae)[0](images)

    def _clip_for(self, clip_skip: int):
        clip = self.clip
        if clip_skip > 1:
            clip = clip.clone()
            clip.clip_layer(-clip_skip)
        return clip

    def text_forward(self, captions: Sequence[str], clip_skip: int = 1):
        """(context, pooled) on the device; with autograd when called under enable_grad (text-encoder training)."""
        if self.clip is None:
            raise TrainingError("no CLIP connected to Train LoRA: it is needed to encode the captions")
        clip = self._clip_for(clip_skip)
        contexts, pooled = [], []
        for caption in captions:
            cond, pool = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
            contexts.append(cond[0])
            pooled.append(pool[0] if pool is not None else None)
        from ..trainer.data.text import stack_contexts

        context = stack_contexts(contexts).to(self.device)
        pooled_t = torch.stack(pooled).to(self.device) if pooled[0] is not None else None
        return context, pooled_t

    def encode_text(self, captions: Sequence[str], clip_skip: int = 1) -> list[dict[str, torch.Tensor]]:
        if self.clip is None:
            raise TrainingError("no CLIP connected to Train LoRA: it is needed to encode the captions")
        clip = self._clip_for(clip_skip)
        if self.is_dit:
            return self._encode_text_dit(clip, captions)
        out = []
        with torch.inference_mode():
            for caption in captions:
                cond, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
                item = {"context": cond[0].float().cpu().clone()}
                if self.family == "sdxl" and pooled is not None:
                    item["pooled"] = pooled[0].float().cpu().clone()
                out.append(item)
        return out

    def _encode_text_dit(self, clip, captions) -> list[dict[str, torch.Tensor]]:
        """Each caption as the family's encoder returns it, all of it: no padding is added or removed, extras
        (attention masks, ...) are kept, and the large contexts are stored in half precision (nodes/dit.py)."""
        from .dit import compact, encoder_extras

        out = []
        with torch.inference_mode():
            for caption in captions:
                result = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True, return_dict=True)
                item = {"context": compact(result["cond"][0].cpu().clone())}
                pooled = result.get("pooled_output")
                if torch.is_tensor(pooled):
                    item["pooled"] = pooled[0].float().cpu().clone()
                item.update(encoder_extras(result))
                out.append(item)
        return out

    # --- services ---------------------------------------------------------------------------------------------
    def memory(self) -> MemoryInfo:
        from ..trainer.monitor.events import memory_snapshot

        snap = memory_snapshot(self.device)
        return MemoryInfo(device=snap["device"], allocated=snap["allocated"], reserved=snap["reserved"],
                          peak=snap["peak"], total=snap["total"], free=int(self.mm.get_free_memory(self.device)))

    def check_interrupt(self) -> None:
        if self.mm.processing_interrupted():
            raise TrainingInterrupted()


LOAD_INSTEAD = "load an SD1.5 or SDXL checkpoint with Load Checkpoint, or a model of a family listed in the README"


def detect_family(base):
    """The trainer/families.py entry for ComfyUI's loaded model, or a TrainingError naming what it is."""
    import comfy.model_base

    from ..trainer.families import FAMILIES, family_for_config

    family = family_for_config([k.__name__ for k in type(base.model_config).__mro__])
    if family is None or family.is_unet:
        # first: SD2.x and inpainting UNets would pass the class tests below. (A DiT's in_channels count its
        # patches, Chroma's and Qwen-Image's 64, so the UNet channel test is not for them.)
        _refuse_unsupported(base)
        if isinstance(base, comfy.model_base.SDXL):
            return FAMILIES["sdxl"]
        if type(base) is comfy.model_base.BaseModel:
            return FAMILIES["sd15"]
        raise TrainingError(
            f"this model ({type(base).__name__}, detected by ComfyUI as {type(base.model_config).__name__}) is not "
            f"supported yet: {LOAD_INSTEAD}")
    if getattr(base, "concat_keys", ()):
        raise TrainingError(f"this {family.title} model takes {', '.join(base.concat_keys)} inputs besides the noise "
                            "(an inpainting / Fill / image-to-video variant): LoRA Lab trains text-to-image models")
    return family


def _refuse_unsupported(base) -> None:
    """Refuse, by name, models that the family tests in ``detect_family`` would take for SD1.5/SDXL.

    SD2.x builds the very class SD1.5 does (``BaseModel``), and inpainting / instruct-pix2pix UNets take extra input
    channels that training cannot supply (a shape error deep in the first step otherwise). The evidence is the config
    class ComfyUI's detection chose (``comfy.supported_models``), not the context width alone.
    """
    import comfy.model_base
    import comfy.supported_models

    config = base.model_config
    latent_channels = base.latent_format.latent_channels
    in_channels = int(config.unet_config.get("in_channels") or latent_channels)
    if isinstance(config, comfy.supported_models.SD20):  # also SD21UnclipL/H, SD_X4Upscaler, LotusD
        variant = [type(config).__name__]
        if base.model_type == comfy.model_base.ModelType.V_PREDICTION:
            variant.append("v-prediction")
        if in_channels != latent_channels:
            variant.append(f"{in_channels}-channel UNet input")
        raise sd2_refusal(", ".join(variant), LOAD_INSTEAD)
    if in_channels != latent_channels:
        # getattr: IP2P is a mixin of recent ComfyUI versions; isinstance(x, ()) is simply False
        if isinstance(base, getattr(comfy.model_base, "IP2P", ())):
            kind = "instruct-pix2pix"
        elif "mask" in getattr(base, "concat_keys", ()):  # what BaseModel.set_inpaint() declares
            kind = "inpainting"
        else:
            kind = None
        family = ("SDXL" if isinstance(base, comfy.model_base.SDXL)
                  else "SD1.5" if isinstance(config, comfy.supported_models.SD15) else None)
        raise input_channels_refusal(in_channels, latent_channels, kind, type(config).__name__, LOAD_INSTEAD, family)


def _ordinary_alias(tensor: torch.Tensor) -> torch.Tensor:
    """An ordinary (non-inference) tensor over an inference tensor's own storage: autograd may save it for the
    backward pass, and no memory is allocated (a clone would double the UNet's footprint). Call it outside inference
    mode. Training never writes the frozen weights, so the original tensor's values stay as they were."""
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


def _norms_on_copies(encoders) -> list:
    """ComfyUI's CLIP layers add their residuals in place (``x += attn(norm(x))``), which overwrites the tensor the
    LayerNorm saved for the backward pass. Giving each LayerNorm a copy of its input (only while gradients are
    recorded) keeps that tensor intact; the sums stay in place, so ComfyUI's code runs unchanged. Returns the
    patched modules (their instance ``forward`` is removed to undo)."""
    patched = []
    for encoder in encoders:
        for module in encoder.modules():
            if isinstance(module, torch.nn.LayerNorm):
                def forward(x, *args, _original=module.forward, **kwargs):
                    return _original(x.clone() if torch.is_grad_enabled() else x, *args, **kwargs)

                module.forward = forward
                patched.append(module)
    return patched


def vae_encoder(vae):
    """(encode_fn, identity) for the latent cache: BHWC [0, 1] images -> unscaled latents on the CPU."""
    if vae is None:
        raise TrainingError("Bucket & Cache Latents needs a VAE: connect the VAE output of Load Checkpoint")

    def encode(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return vae.encode(images[..., :3]).float().cpu()

    return encode, module_fingerprint(vae.first_stage_model, "comfy-vae")
