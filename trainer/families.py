"""Every model family the pack trains, described in one place: a few lines per family, no code per family.

A family is what ComfyUI's model detection picked (the ``comfy.supported_models`` config class; class names are
strings here, so this module imports neither torch nor ComfyUI). Everything family-specific that the generic host
(``nodes/comfy_host.py``), the target selection, the LoRA file's metadata and pre-flight need is a field below:

* ``blocks``: the ``diffusion_model`` attributes holding the transformer blocks. Gradient checkpointing wraps each
  block; the ``transformer`` target set is every Linear inside them (kohya's default for every DiT trainer).
* ``attention_extra``: Linears inside the blocks that the ``attention`` target set takes besides those under a
  module named ``*attn*`` / ``*attention*`` (Flux's single blocks fuse q, k, v and the MLP into ``linear1``).
* ``inplace_residuals``: the blocks add residuals in place onto tensors a LayerNorm saved for backward (Flux,
  Chroma); the host gives those LayerNorms a copy of their input while gradients are recorded.
* ``timesteps``: what timestep sampling ``auto`` means: ``uniform`` (SD1.5/SDXL), ``shifted`` (logit-normal shifted
  by the model's own sampling shift: SD3's recipe), ``flux_shift`` (shift from the image's token count, 0.5 at 256
  tokens to 1.15 at 4096: the reference Flux trainers' recipe).
* ``guidance``: the value of the guidance embedding while training a guidance-distilled model (Flux dev: 1.0, as
  kohya's and ai-toolkit's Flux guides use; Chroma: 0, its own default); None: the model has no guidance input.
* ``context_key`` / ``pooled_key``: the ``unet_config`` entries that give the text context's and pooled vector's
  widths (pre-flight and the memory estimate use them when no text encoder is connected).

Names in LoRA files: SD1.5 keeps kohya's diffusers paths and SDXL its ldm paths (``adapters/kohya_names.py``);
every DiT family is ``lora_unet_`` + the module path under ``diffusion_model`` with ``.`` -> ``_``, kohya's rule for
SD3 and Flux, which ComfyUI's LoraLoader maps for every model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Family:
    name: str                      # our id: "sd15", "flux_dev", ...
    title: str                     # what users call it
    config_classes: tuple          # comfy.supported_models class names that mean this family
    base_version: str              # ss_base_model_version (kohya)
    architecture: str              # modelspec.architecture (without "/lora")
    native_resolution: int         # the side the family was trained at (pre-flight warns far from it)
    loaders: str                   # ComfyUI nodes that load it (README table)
    timesteps: str = "uniform"     # what timestep_sampling "auto" means
    blocks: tuple = ()             # diffusion_model attributes: ModuleLists of transformer blocks (DiT only)
    attention_extra: tuple = ()    # path suffixes the attention set adds (see module docstring)
    inplace_residuals: bool = False
    guidance: Optional[float] = None
    context_key: str = ""          # unet_config key of the text context width ("a.b" walks nested dicts)
    pooled_key: str = ""           # unet_config key of the pooled vector width
    text_encoder_training: bool = False
    side_multiple: int = 16        # image sides in multiples of this (2x2 patches at 1/8 scale)
    needs_text_mask: bool = False  # extra_conds needs an attention mask (Lumina2 counts its tokens from it)

    @property
    def is_unet(self) -> bool:
        return not self.blocks


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("sd15", "SD1.5", ("SD15",), "sd_v1", "stable-diffusion-v1", 512, "Load Checkpoint",
           text_encoder_training=True, side_multiple=64, context_key="context_dim"),
    Family("sdxl", "SDXL", ("SDXL",), "sdxl_base_v1-0", "stable-diffusion-xl-v1-base", 1024, "Load Checkpoint",
           text_encoder_training=True, side_multiple=64, context_key="context_dim", pooled_key="adm_in_channels"),
    Family("sd3", "SD3 / SD3.5", ("SD3",), "sd3", "stable-diffusion-v3", 1024,
           "Load Checkpoint, or UNETLoader + TripleCLIPLoader + VAELoader", timesteps="shifted",
           blocks=("joint_blocks",), context_key="context_embedder_config.params.in_features",
           pooled_key="adm_in_channels"),
    Family("flux_dev", "Flux.1 dev", ("Flux",), "flux1", "flux-1-dev", 1024,
           "UNETLoader + DualCLIPLoader (flux) + VAELoader", timesteps="flux_shift",
           blocks=("double_blocks", "single_blocks"), attention_extra=(".linear1", ".linear2"),
           inplace_residuals=True, guidance=1.0, context_key="context_in_dim", pooled_key="vec_in_dim"),
    Family("flux_schnell", "Flux.1 schnell", ("FluxSchnell",), "flux1", "flux-1-schnell", 1024,
           "UNETLoader + DualCLIPLoader (flux) + VAELoader", timesteps="flux_shift",
           blocks=("double_blocks", "single_blocks"), attention_extra=(".linear1", ".linear2"),
           inplace_residuals=True, context_key="context_in_dim", pooled_key="vec_in_dim"),
    Family("chroma", "Chroma", ("Chroma",), "chroma", "chroma", 1024,
           "UNETLoader + CLIPLoader (chroma) + VAELoader", timesteps="flux_shift",
           blocks=("double_blocks", "single_blocks"), attention_extra=(".linear1", ".linear2"),
           inplace_residuals=True, guidance=0.0, context_key="context_in_dim"),
    Family("qwen_image", "Qwen-Image", ("QwenImage",), "qwen_image", "qwen-image", 1328,
           "UNETLoader + CLIPLoader (qwen_image) + VAELoader", timesteps="flux_shift",
           blocks=("transformer_blocks",), context_key="joint_attention_dim"),
    Family("lumina2", "Lumina 2 / Neta", ("Lumina2",), "lumina2", "lumina-2", 1024,
           "UNETLoader + CLIPLoader (lumina2) + VAELoader, or Load Checkpoint", timesteps="shifted",
           blocks=("layers", "noise_refiner", "context_refiner"), context_key="cap_feat_dim", needs_text_mask=True),
    Family("wan21", "Wan 2.1 / 2.2 14B (text to video, trained on stills)", ("WAN21_T2V",), "wan21", "wan-2-1", 832,
           "UNETLoader + CLIPLoader (wan) + VAELoader", timesteps="shifted", blocks=("blocks",),
           context_key="text_dim"),
    Family("wan22_5b", "Wan 2.2 5B (trained on stills)", ("WAN22_T2V",), "wan22", "wan-2-2-5b", 1280,
           "UNETLoader + CLIPLoader (wan) + VAELoader", timesteps="shifted", blocks=("blocks",),
           context_key="text_dim", side_multiple=32),
    Family("auraflow", "AuraFlow", ("AuraFlow",), "auraflow", "auraflow", 1024,
           "Load Checkpoint", timesteps="shifted", blocks=("double_layers", "single_layers"),
           context_key="cond_seq_dim"),
    Family("hidream", "HiDream-I1", ("HiDream",), "hidream", "hidream-i1", 1024,
           "UNETLoader + QuadrupleCLIPLoader + VAELoader", timesteps="shifted",
           blocks=("double_stream_blocks", "single_stream_blocks")),
]}


def family_for_config(class_names) -> Optional[Family]:
    """The family of a model whose config class has these names, most specific first (its MRO): a subclass that
    is a family of its own (FluxSchnell under Flux) wins over its parent."""
    for name in class_names:
        for family in FAMILIES.values():
            if name in family.config_classes:
                return family
    return None


def config_value(unet_config, dotted: str) -> Optional[int]:
    """``unet_config["a"]["b"]`` for ``"a.b"``, as an int, or None when any level is missing."""
    value = unet_config
    for part in dotted.split(".") if dotted else ():
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and dotted else None
