"""Tiny random-weight flow / DiT MODELs of every family ComfyUI trains with a flow objective, built in-process with
ComfyUI's own classes, plus what a training test needs around them (conditioning, text encoders, a 16-channel VAE,
block lists, the in-place-residual fix).

Import this where ComfyUI is importable (``harness.import_comfy`` / the ``comfy`` fixture); nothing from ComfyUI or
torch is imported at module import time.

How a MODEL is built (``build_model(family)``): ``comfy.model_detection.model_config_from_unet_config(config)`` picks
the same ``supported_models`` class a real load would, ``set_inference_dtype(fp32)``, ``get_model({})`` builds the
real ``comfy.model_base`` class, a random state dict (fixed seed, every parameter and buffer written: ComfyUI's
``disable_weight_init`` layers are otherwise uninitialised memory) goes in through ``load_model_weights`` and the
result is wrapped in ``comfy.model_patcher.ModelPatcher`` exactly as ``comfy.sd.load_diffusion_model_state_dict``
does. Only key/shape detection is skipped: the pinned ComfyUI detects Flux, Chroma, Qwen-Image, Lumina2, AuraFlow and
HiDream with full-size widths fixed in code. SD3's detection derives its width from the weights, so SD3 also has a
stock-loader checkpoint (``build_sd3_checkpoint``: tiny MMDiT + full-size CLIP-L/G as strided views + 16-channel
TAESD, no T5) that ``CheckpointLoaderSimple`` detects as ``SD3``.

Verified per family (ComfyUI v0.3.64, CPU, fp32; tests/comfy/test_tiny_flow.py checks every column). All have
< 2.1 M parameters; a forward + backward at 64 px (batch 2) takes 0.1-0.5 s on 2 shared CPU cores.

| family | config -> model_base, ModelType | latent, 64 px | per-sample extra_conds kwargs -> model kwargs | block lists [block classes] | LN fix | tiny text encoder | model_sampling |
|---|---|---|---|---|---|---|---|
| sd3 | SD3 -> SD3, FLOW | (B,16,8,8) | cross_attn (1,L,4096), pooled_output (1,2048) -> y | joint_blocks [JointBlock > DismantledBlock] | no | checkpoint: CLIP-L+G, 77 tok | DiscreteFlow 3.0 x1000 |
| sd35_medium | SD3 + qk_norm rms + x_block.attn2 (block 0) | same | same | same | no | same | same |
| sd35_large | SD3 + qk_norm rms, no attn2 | same | same | same | no | same | same |
| flux_dev | Flux -> Flux, FLUX | (B,16,8,8) | cross_attn (1,L,64), pooled_output (1,64) -> y, guidance 1.0 -> guidance (1,) | double_blocks, single_blocks [DoubleStreamBlock, SingleStreamBlock] | **yes** | T5 (256 tok) + CLIP-L pooled | Flux mu 1.15 (= shift e^mu 3.16) |
| flux_schnell | FluxSchnell -> Flux, FLOW | same | same, guidance=None (no guidance key) | same | **yes** | same | DiscreteFlow 1.0 x1 |
| chroma | Chroma -> Chroma, FLUX | (B,16,8,8) | cross_attn (1,L,64), pooled_output=None (key required), guidance default 0 -> (1,) | double_blocks, single_blocks [chroma's DoubleStreamBlock, SingleStreamBlock] | **yes** | T5, unpadded | Flux mu 1.15 |
| qwen_image | QwenImage -> QwenImage, FLUX | (B,16,1,8,8) | cross_attn (1,L,64) | transformer_blocks [QwenImageTransformerBlock] | no | none | Flux mu 1.15 |
| lumina2 | Lumina2 -> Lumina2, FLOW | (B,16,8,8) | cross_attn (1,L,64), attention_mask (1,L) -> num_tokens (+attention_mask if padded) | layers, noise_refiner, context_refiner [JointTransformerBlock] | no | Gemma-2 + mask, unpadded | DiscreteFlow 6.0 x1 |
| wan21 | WAN21_T2V -> WAN21, FLOW | (B,16,1,8,8) | cross_attn (1,L,64) | blocks [WanAttentionBlock] | no | UMT5, 512 tok | DiscreteFlow 8.0 x1000 |
| wan22_5b | WAN22_T2V -> WAN22, FLOW | (B,48,1,4,4) (VAE /16) | same | same | no | same | same |
| auraflow | AuraFlow -> AuraFlow, FLOW | (B,4,8,8) | cross_attn (1,L,2048) | double_layers, single_layers [MMDiTBlock, DiTBlock] | no | Pile-T5-XL, 256 tok | DiscreteFlow 1.73 x1 |
| hidream | HiDream -> HiDream, FLOW | (B,16,8,8) | cross_attn (1,L,64) (T5), pooled_output (1,64) -> y, conditioning_llama3 (1,2,L,64) -> encoder_hidden_states_llama3 | double_stream_blocks, single_stream_blocks [HiDreamImageBlock > .block] | no | none | DiscreteFlow 1.0 x1000 |

"DiscreteFlow s xm": ``ModelSamplingDiscreteFlow`` with ``.shift`` s and ``.multiplier`` m (the model gets t = m*sigma);
"Flux mu": ``ModelSamplingFlux``, whose ``.shift`` is mu and which passes t = sigma. Latent formats (process_in):
SD3 (x-0.0609)*1.5305; Flux (also Chroma, Lumina2, HiDream) (x-0.1159)*0.3611; Wan21 (Qwen-Image, Wan 2.1) and
Wan22 per-channel mean/std on 5-D latents only; AuraFlow SDXL x*0.13025. Wan 2.2 14B has no distinguishing key in
this detection code (it loads as WAN21_T2V); the 5B is WAN22 (48 channels, 16x VAE, per-token timesteps only with
a denoise_mask).

Linears inside the blocks (``block_linears``; kohya-style name = ``lora_unet_`` + path with . -> _):
  DismantledBlock attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1 (+attn2.qkv/proj; the last
  context_block only attn.qkv + adaLN_modulation.1) | Flux DoubleStreamBlock {img,txt}_mod.lin, _attn.qkv,
  _attn.proj, _mlp.0, _mlp.2; SingleStreamBlock linear1, linear2, modulation.lin | Chroma: the same without the
  *mod* Linears (modulation comes from distilled_guidance_layer) | QwenImageTransformerBlock attn.to_q/k/v,
  add_q/k/v_proj, to_out.0, to_add_out, img_mod.1, txt_mod.1, {img,txt}_mlp.net.0.proj, net.2 |
  JointTransformerBlock attention.qkv, attention.out, feed_forward.w1/w2/w3, adaLN_modulation.1 (none in
  context_refiner) | WanAttentionBlock self_attn.q/k/v/o, cross_attn.q/k/v/o, ffn.0, ffn.2 | AuraFlow MMDiTBlock
  attn.w1q/k/v/o, w2q/k/v/o, mlpC/mlpX.c_fc1/c_fc2/c_proj, modC.1, modX.1; DiTBlock attn.w1q/k/v/o,
  mlp.c_fc1/c_fc2/c_proj, modCX.1 | HiDream block.attn1.to_q/k/v/out (+_t), block.ff_i.shared_experts.w1/w2/w3,
  block.ff_i.experts.N.w1/w2/w3, block.ff_t.w1/w2/w3, block.adaLN_modulation.1.

Everywhere: ``ms.calculate_input(s, x) = x``, the output is v = eps - x0 and ``apply_model(x, s, ...) = x - s*v``
(``CONST``). Call ``extra_conds`` **per sample** (batch 1) and join samples with the cond objects' own ``concat``
(what ComfyUI's sampler does): a batched call is wrong for Lumina2 (``num_tokens`` = sum of the whole batch's mask)
and for Chroma (``guidance`` stays shape (1,)). ``model_inputs`` / ``predict`` below do exactly that.
Backward: Flux dev/schnell and Chroma raise "modified by an inplace operation" unless every ``torch.nn.LayerNorm``
gets a copy of its input (``norms_on_copies``); every other family trains as is. Per-block non-reentrant
checkpointing over the block lists gives the same gradients when the block inputs are cloned inside the
checkpointed function (``checkpointed_blocks``). ``comfy.lora.model_lora_keys_unet(base, {})`` maps
``lora_unet_<path with . -> _>`` to ``diffusion_model.<path>.weight`` for every Linear under the blocks.
UNETLoader (``load_diffusion_model_state_dict``) cannot load the non-SD3 tiny state dicts: detection fixes their
widths (Flux/Chroma hidden 3072, Lumina2 dim 2304, Wan text_dim 4096 with heads = dim/128, ...), size mismatch.
fp8: ``build_model(family, weight_dtype=torch.float8_e4m3fn)`` stores fp8 weights computed in fp32 (manual cast).

Text encoders (``build_text_encoder(family)``): ComfyUI's own ``comfy.sd.CLIP`` from the family's ``clip_target``
with the encoder configs shrunk through ``model_options["<name>_model_config"]`` (the dict
``load_checkpoint_guess_config(te_model_options=...)`` passes on), random weights, fp32. Flux also loads through
``comfy.sd.load_text_encoder_state_dicts`` (DualCLIPLoader's path): ``build_flux_text_encoder_from_files``; there
ComfyUI replaces ``clip_l_model_config`` by ``model_options["model_config"]`` (long-CLIP handling), so the CLIP-L
shrink must go under that key. Gemma (Lumina2) and UMT5 (Wan) read a SentencePiece model from the text-encoder file:
``tiny_spiece_model`` trains a 256-piece one in-process. CLIP-L/G and Gemma read hidden layer -2: >= 3 layers.
Not available (``TEXT_ENCODER_UNAVAILABLE``):
  * qwen_image: the Qwen2.5-VL LM shrinks (``qwen25_7b_model_config``: hidden 64, 3 layers works), but
    ``Qwen25_7BVLI`` always builds its full-size vision tower (hidden 1280 x 32 layers, no config key): 0.67 B
    parameters, 13 s to build on 2 CPU cores. Use random ``cross_attn`` (1, L, 64) instead.
  * hidream: ``supported_models.HiDream.clip_target`` returns None in this version and the Llama-3 tokenizer
    (``comfy/text_encoders/llama_tokenizer/tokenizer.json``) is missing from the checkout.
Latents: ``build_taesd16_vae()`` is a 16-channel TAESD (``comfy.sd.VAE``): (B,16,H/8,W/8); unsqueeze(2) for the
5-D families. No tiny VAE here for AuraFlow (4 channels: tiny_checkpoints' TAESD) or Wan 2.2 5B (48 channels).
SD3 checkpoint: ``build_sd3_checkpoint(path, family)`` (23 MB) loads through ``load_checkpoint_guess_config`` with
full-size CLIP-L/G (3 s load, 2.1 GB peak RSS, ~9 s for the first encode) or with ``te_model_options`` 3-layer
CLIP-L/G (1.2 s); its MMDiT weights equal ``build_model(family)``'s for the same seed.
"""
from __future__ import annotations

import contextlib
import io
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

TEXT_WIDTH = 64      # context width of every family whose width is free (Flux, Chroma, Qwen, Lumina2, Wan, HiDream)
POOLED_WIDTH = 64    # pooled-vector width where free (Flux's CLIP-L, HiDream)
SD3_DEPTH = 2        # MMDiT hidden = 64 * depth, heads = depth (detection rule)


@dataclass(frozen=True)
class Family:
    name: str
    unet_config: dict
    config_class: str                 # comfy.supported_models class model_config_from_unet_config picks
    model_class: str                  # comfy.model_base class
    model_type: str                   # ModelType name
    sampling: str                     # "discrete_flow" (ModelSamplingDiscreteFlow) or "flux" (ModelSamplingFlux)
    shift: float                      # .shift as stored (mu for "flux")
    multiplier: Optional[float]       # .multiplier (DiscreteFlow only)
    latent_channels: int
    latent_dims: int                  # 2: (B,C,H,W); 3: (B,C,1,H,W)
    vae_scale: int                    # pixels per latent cell
    context_width: int
    pooled_width: Optional[int] = None
    guidance: Any = "absent"          # per-sample "guidance" kwarg for extra_conds ("absent": not passed)
    needs_pooled_key: bool = False    # extra_conds reads kwargs["pooled_output"] even when unused (pass None)
    attention_mask: bool = False      # pass a (1, L) mask (Lumina2 derives num_tokens from it)
    llama_layers: int = 0             # HiDream: conditioning_llama3 (1, layers, L, width)
    model_keys: tuple = ("c_crossattn",)  # what extra_conds turns those into (c_crossattn becomes context=)
    block_lists: tuple = ()           # diffusion_model attributes: the ModuleLists of transformer blocks
    block_classes: tuple = ()         # class names of their elements (and of the blocks nested inside them)
    needs_norm_copies: bool = False   # backward needs norms_on_copies (in-place residuals)
    text_encoder: Optional[str] = None          # build_text_encoder kind; None: see TEXT_ENCODER_UNAVAILABLE


_SD3_BASE = dict(
    in_channels=16, patch_size=2, out_channels=16, depth=SD3_DEPTH, input_size=None, adm_in_channels=2048,
    context_embedder_config={"target": "torch.nn.Linear",
                             "params": {"in_features": 4096, "out_features": 64 * SD3_DEPTH}},
    num_patches=32 * 32, pos_embed_max_size=32, pos_embed_scaling_factor=None, x_block_self_attn_layers=[],
)
_FLUX_BASE = dict(
    image_model="flux", in_channels=16, out_channels=16, vec_in_dim=POOLED_WIDTH, context_in_dim=TEXT_WIDTH,
    hidden_size=128, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 28, 28], theta=10000,
    patch_size=2, qkv_bias=True,
)
_WAN_BASE = dict(
    image_model="wan2.1", model_type="t2v", dim=128, num_heads=2, ffn_dim=256, num_layers=2, patch_size=(1, 2, 2),
    freq_dim=256, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6, text_dim=TEXT_WIDTH,
    in_dim=16, out_dim=16,
)
_SD3_COMMON = dict(config_class="SD3", model_class="SD3", model_type="FLOW", sampling="discrete_flow", shift=3.0,
                   multiplier=1000.0, latent_channels=16, latent_dims=2, vae_scale=8, context_width=4096,
                   pooled_width=2048, model_keys=("c_crossattn", "y"), block_lists=("joint_blocks",),
                   block_classes=("JointBlock", "DismantledBlock"),
                   text_encoder="sd3")
_FLUX_COMMON = dict(model_class="Flux", latent_channels=16, latent_dims=2, vae_scale=8, context_width=TEXT_WIDTH,
                    pooled_width=POOLED_WIDTH, block_lists=("double_blocks", "single_blocks"),
                    block_classes=("DoubleStreamBlock", "SingleStreamBlock"), needs_norm_copies=True,
                    text_encoder="flux")
_WAN_COMMON = dict(model_type="FLOW", sampling="discrete_flow", shift=8.0, multiplier=1000.0, latent_dims=3,
                   context_width=TEXT_WIDTH, block_lists=("blocks",), block_classes=("WanAttentionBlock",),
                   text_encoder="wan")

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("sd3", dict(_SD3_BASE), **_SD3_COMMON),
    Family("sd35_medium", dict(_SD3_BASE, qk_norm="rms", x_block_self_attn_layers=[0]), **_SD3_COMMON),
    Family("sd35_large", dict(_SD3_BASE, qk_norm="rms"), **_SD3_COMMON),
    Family("flux_dev", dict(_FLUX_BASE, guidance_embed=True), config_class="Flux", model_type="FLUX",
           sampling="flux", shift=1.15, multiplier=None, guidance=1.0, model_keys=("c_crossattn", "y", "guidance"),
           **_FLUX_COMMON),
    Family("flux_schnell", dict(_FLUX_BASE, guidance_embed=False), config_class="FluxSchnell", model_type="FLOW",
           sampling="discrete_flow", shift=1.0, multiplier=1.0, guidance=None, model_keys=("c_crossattn", "y"),
           **_FLUX_COMMON),
    Family("chroma", dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=TEXT_WIDTH,
                          hidden_size=128, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2,
                          axes_dim=[8, 28, 28], theta=10000, patch_size=2, qkv_bias=True,
                          in_dim=64, out_dim=128, hidden_dim=64, n_layers=1),
           config_class="Chroma", model_class="Chroma", model_type="FLUX", sampling="flux", shift=1.15,
           multiplier=None, latent_channels=16, latent_dims=2, vae_scale=8, context_width=TEXT_WIDTH,
           needs_pooled_key=True, model_keys=("c_crossattn", "guidance"),
           block_lists=("double_blocks", "single_blocks"),
           block_classes=("DoubleStreamBlock", "SingleStreamBlock"), needs_norm_copies=True, text_encoder="chroma"),
    Family("qwen_image", dict(image_model="qwen_image", in_channels=64, out_channels=16, num_layers=2,
                              attention_head_dim=64, num_attention_heads=2, joint_attention_dim=TEXT_WIDTH,
                              axes_dims_rope=(8, 28, 28)),
           config_class="QwenImage", model_class="QwenImage", model_type="FLUX", sampling="flux", shift=1.15,
           multiplier=None, latent_channels=16, latent_dims=3, vae_scale=8, context_width=TEXT_WIDTH,
           block_lists=("transformer_blocks",), block_classes=("QwenImageTransformerBlock",)),
    Family("lumina2", dict(image_model="lumina2", patch_size=2, in_channels=16, dim=128, cap_feat_dim=TEXT_WIDTH,
                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=1, multiple_of=16, qk_norm=True,
                           axes_dims=[16, 24, 24], axes_lens=[300, 512, 512]),
           config_class="Lumina2", model_class="Lumina2", model_type="FLOW", sampling="discrete_flow", shift=6.0,
           multiplier=1.0, latent_channels=16, latent_dims=2, vae_scale=8, context_width=TEXT_WIDTH,
           attention_mask=True, model_keys=("c_crossattn", "num_tokens"),
           block_lists=("layers", "noise_refiner", "context_refiner"),
           block_classes=("JointTransformerBlock",), text_encoder="lumina2"),
    Family("wan21", dict(_WAN_BASE), config_class="WAN21_T2V", model_class="WAN21", latent_channels=16,
           vae_scale=8, **_WAN_COMMON),
    Family("wan22_5b", dict(_WAN_BASE, in_dim=48, out_dim=48), config_class="WAN22_T2V", model_class="WAN22",
           latent_channels=48, vae_scale=16, **_WAN_COMMON),
    Family("auraflow", dict(max_seq=256, cond_seq_dim=2048, n_double_layers=1, n_layers=2, dim=128, n_heads=2,
                            global_conddim=128),
           config_class="AuraFlow", model_class="AuraFlow", model_type="FLOW", sampling="discrete_flow", shift=1.73,
           multiplier=1.0, latent_channels=4, latent_dims=2, vae_scale=8, context_width=2048,
           block_lists=("double_layers", "single_layers"), block_classes=("MMDiTBlock", "DiTBlock"),
           text_encoder="auraflow"),
    Family("hidream", dict(image_model="hidream", attention_head_dim=64, axes_dims_rope=[32, 16, 16],
                           caption_channels=[TEXT_WIDTH, TEXT_WIDTH], max_resolution=[128, 128], in_channels=16,
                           llama_layers=[0, 1], num_attention_heads=2, num_routed_experts=2, num_activated_experts=1,
                           num_layers=1, num_single_layers=1, out_channels=16, patch_size=2,
                           text_emb_dim=POOLED_WIDTH),
           config_class="HiDream", model_class="HiDream", model_type="FLOW", sampling="discrete_flow", shift=1.0,
           multiplier=1000.0, latent_channels=16, latent_dims=2, vae_scale=8, context_width=TEXT_WIDTH,
           pooled_width=POOLED_WIDTH, llama_layers=2,
           model_keys=("c_crossattn", "y", "encoder_hidden_states_llama3"),
           block_lists=("double_stream_blocks", "single_stream_blocks"),
           block_classes=("HiDreamImageBlock", "HiDreamImageTransformerBlock", "HiDreamImageSingleTransformerBlock")),
]}

# Why no tiny text encoder exists for these families (see the module docstring).
TEXT_ENCODER_UNAVAILABLE = {
    "qwen_image": "Qwen25_7BVLI always builds its full-size vision tower (0.67 B parameters; no config key)",
    "hidream": "supported_models.HiDream.clip_target() is None and the Llama-3 tokenizer.json is missing",
}


# ------------------------------------------------------------------------------------------------ weights

def _random_like(name: str, t, gen):
    """Variance-preserving random values: weights N(0, 1/fan_in); 1-D norm scales 1 + N(0, 0.02²); else N(0, 0.02²)."""
    import torch

    if not t.is_floating_point():
        return torch.zeros(t.shape, dtype=t.dtype)
    if t.ndim >= 2 and name.endswith("weight"):
        value = torch.randn(t.shape, generator=gen) / t[0].numel() ** 0.5
    elif t.ndim == 1 and name.endswith(("weight", "scale")):
        value = 1.0 + 0.02 * torch.randn(t.shape, generator=gen)
    else:
        value = 0.02 * torch.randn(t.shape, generator=gen)
    return value.to(t.dtype)


def random_state_dict(module, seed: int = 0) -> dict:
    """A fresh random CPU tensor for every entry of ``module.state_dict()`` (the module may live on ``meta``)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return {k: _random_like(k, v, gen) for k, v in module.state_dict().items()}


def model_config(family: str, weight_dtype=None):
    """The ``supported_models`` config ComfyUI would pick, set to fp32 (or ``weight_dtype`` with fp32 manual cast)."""
    import comfy.model_detection
    import torch

    spec = FAMILIES[family]
    mc = comfy.model_detection.model_config_from_unet_config(dict(spec.unet_config))
    if mc is None or type(mc).__name__ != spec.config_class:
        raise RuntimeError(f"{family}: unet_config matched {type(mc).__name__}, expected {spec.config_class}")
    if weight_dtype is None or weight_dtype == torch.float32:
        mc.set_inference_dtype(torch.float32, None)
    else:
        mc.set_inference_dtype(weight_dtype, torch.float32)
    return mc


def build_model(family: str, seed: int = 0, weight_dtype=None):
    """A ModelPatcher over the real ``comfy.model_base`` class with random weights (see module docstring).

    weight_dtype: None/fp32, or e.g. ``torch.float8_e4m3fn`` (stored in that dtype, computed in fp32 through
    ComfyUI's manual-cast ops, as UNETLoader's ``weight_dtype`` option does on CPU)."""
    import comfy.model_management
    import comfy.model_patcher

    mc = model_config(family, weight_dtype)
    base = mc.get_model({})
    offload = comfy.model_management.unet_offload_device()
    base = base.to(offload)
    base.load_model_weights(random_state_dict(base.diffusion_model, seed), "")
    return comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=offload)


# ------------------------------------------------------------------------------------------------ inputs

def latent_shape(family: str, batch: int = 1, height: int = 64, width: int = 64) -> tuple:
    """The latent the family's diffusion model takes for a ``height`` x ``width`` pixel image."""
    spec = FAMILIES[family]
    h, w = height // spec.vae_scale, width // spec.vae_scale
    if spec.latent_dims == 3:
        return (batch, spec.latent_channels, 1, h, w)
    return (batch, spec.latent_channels, h, w)


def conditioning(family: str, batch: int = 1, tokens: int = 8, seed: int = 0, guidance=None) -> list:
    """Per-sample keyword arguments for ``base.extra_conds`` (tensors have batch 1), as a text cache would hold them.

    guidance: overrides the family default (Flux dev 1.0, Chroma 0 via ComfyUI's default); ignored where absent."""
    import torch

    spec = FAMILIES[family]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        c = {"cross_attn": torch.randn(1, tokens, spec.context_width, generator=gen)}
        if spec.pooled_width:
            c["pooled_output"] = torch.randn(1, spec.pooled_width, generator=gen)
        elif spec.needs_pooled_key:
            c["pooled_output"] = None
        if spec.guidance != "absent":
            c["guidance"] = spec.guidance if (guidance is None or spec.guidance is None) else guidance
        if spec.attention_mask:
            c["attention_mask"] = torch.ones(1, tokens, dtype=torch.long)
        if spec.llama_layers:
            c["conditioning_llama3"] = torch.randn(1, spec.llama_layers, tokens, spec.context_width, generator=gen)
        out.append(c)
    return out


def model_inputs(base, x, per_sample: list) -> dict:
    """``extra_conds`` per sample, joined over the batch with the cond objects' ``concat`` (ComfyUI's sampler does
    the same): {"c_crossattn": context, other model kwargs...}."""
    if len(per_sample) != x.shape[0]:
        raise ValueError(f"{len(per_sample)} conditionings for a batch of {x.shape[0]}")
    conds = []
    for i, c in enumerate(per_sample):
        raw = base.extra_conds(noise=x[i:i + 1], device=x.device, **c)
        conds.append({k: v.process_cond(batch_size=1, device=x.device, area=None) for k, v in raw.items()})
    keys = set(conds[0])
    if any(set(c) != keys for c in conds):
        raise ValueError("samples produced different conditioning keys")
    return {k: conds[0][k].concat([c[k] for c in conds[1:]]) for k in conds[0]}


def predict(model, x, sigma, per_sample: list, transformer_options=None):
    """The generic call: the family's raw output (v = eps - x0 for every flow family) at noisy latent ``x``."""
    base = model.model
    ms = model.get_model_object("model_sampling")
    kw = model_inputs(base, x, per_sample)
    context = kw.pop("c_crossattn")
    xc = ms.calculate_input(sigma, x)
    c_concat = kw.pop("c_concat", None)
    if c_concat is not None:
        import torch

        xc = torch.cat([xc, c_concat.to(xc)], dim=1)
    dtype = base.manual_cast_dtype or base.get_dtype()
    t = base.process_timestep(ms.timestep(sigma).float(), x=x, **kw)
    return base.diffusion_model(xc.to(dtype), t, context=context.to(dtype), control=None,
                                transformer_options=transformer_options or {}, **kw).float()


def apply_model(model, x, sigma, per_sample: list):
    """ComfyUI's own ``BaseModel.apply_model`` (x0 in the CONST convention) with the same inputs as ``predict``."""
    kw = model_inputs(model.model, x, per_sample)
    return model.model.apply_model(x, sigma, **kw)


# ------------------------------------------------------------------------------------------------ training helpers

@contextlib.contextmanager
def norms_on_copies(module):
    """Feed every ``torch.nn.LayerNorm`` under ``module`` a copy of its input while gradients are recorded (the fix
    for blocks that add residuals in place: Flux, Chroma). Restores the modules on exit."""
    import torch

    patched = []
    for m in module.modules():
        if isinstance(m, torch.nn.LayerNorm):
            def forward(x, *args, _original=m.forward, **kwargs):
                return _original(x.clone() if torch.is_grad_enabled() else x, *args, **kwargs)

            m.forward = forward
            patched.append(m)
    try:
        yield patched
    finally:
        for m in patched:
            del m.forward


def _clone_tensors(value):
    import torch

    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_clone_tensors(v) for v in value)
    return value


@contextlib.contextmanager
def checkpointed_blocks(diffusion_model, block_lists):
    """Non-reentrant gradient checkpointing of every block in the named ModuleLists; the tensor inputs are cloned
    *inside* the checkpointed function (blocks that mutate their inputs break the recompute otherwise)."""
    import torch.utils.checkpoint

    blocks = [b for name in block_lists for b in getattr(diffusion_model, name)]
    for block in blocks:
        def forward(*args, _original=block.forward, **kwargs):
            def run(*a, **k):
                return _original(*_clone_tensors(a), **{n: _clone_tensors(v) for n, v in k.items()})

            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    try:
        yield blocks
    finally:
        for block in blocks:
            del block.forward


def block_linears(base, family: str) -> list:
    """[(path under diffusion_model, torch.nn.Linear)] for every Linear inside the family's block lists."""
    import torch

    dm = base.diffusion_model
    out = []
    for list_name in FAMILIES[family].block_lists:
        for path, m in getattr(dm, list_name).named_modules(prefix=list_name):
            if isinstance(m, torch.nn.Linear):
                out.append((path, m))
    return out


# ------------------------------------------------------------------------------------------------ text encoders

_SPIECE_CACHE: dict = {}


def tiny_spiece_model(bos_id: int, eos_id: int, pad_id: int, unk_id: int, vocab_size: int = 256):
    """A small SentencePiece model (uint8 tensor, the form ComfyUI stores as ``spiece_model``) trained in-process on
    a fixed synthetic corpus, with the special-token ids the text encoder expects. Deterministic; cached."""
    import torch

    key = (bos_id, eos_id, pad_id, unk_id, vocab_size)
    if key not in _SPIECE_CACHE:
        import sentencepiece

        words = ("a photo of the cat dog red blue green white black house tree car person woman man sky river "
                 "mountain painting portrait small large old new bright dark city street forest beach").split()
        rng = random.Random(0)
        corpus = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(600)]
        buf = io.BytesIO()
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
            bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, unk_id=unk_id, hard_vocab_limit=False, num_threads=1,
            minloglevel=2)
        _SPIECE_CACHE[key] = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    return _SPIECE_CACHE[key].clone()


def _t5(width, **extra):
    return dict(d_model=width, num_layers=1, d_ff=2 * width, num_heads=2, d_kv=width // 2, **extra)


def _clip_l(width):
    return dict(hidden_size=width, intermediate_size=2 * width, num_attention_heads=2, num_hidden_layers=3,
                projection_dim=width)


def text_encoder_options(family: str) -> tuple:
    """(clip_target, model_options, tokenizer_data) for ``comfy.sd.CLIP``: the family's own target with shrunk
    encoder configs (fp32)."""
    import comfy.supported_models as sm
    import torch

    spec = FAMILIES.get(family)
    kind = spec.text_encoder if spec else None
    if kind is None:
        raise ValueError(f"no tiny text encoder for {family!r}: {TEXT_ENCODER_UNAVAILABLE.get(family, 'unknown family')}")
    mc = getattr(sm, spec.config_class)(dict(spec.unet_config))
    options = {"dtype": torch.float32}
    tokenizer_data = {}
    if kind == "sd3":  # CLIP-L + CLIP-G, no T5 (what a checkpoint holding only text_encoders.clip_l/clip_g gives)
        present = {f"text_encoders.clip_{n}.transformer.text_model.final_layer_norm.weight": None for n in "lg"}
        target = mc.clip_target(present)
        options.update(clip_l_model_config={"num_hidden_layers": 3}, clip_g_model_config={"num_hidden_layers": 3})
        return target, options, tokenizer_data
    target = mc.clip_target({})
    if kind == "flux":
        options.update(t5xxl_model_config=_t5(TEXT_WIDTH), clip_l_model_config=_clip_l(POOLED_WIDTH))
    elif kind == "chroma":
        options.update(t5xxl_model_config=_t5(TEXT_WIDTH))
    elif kind == "auraflow":  # cond_seq_dim 2048 is what selects supported_models.AuraFlow: width stays 2048
        options.update(pile_t5xl_model_config=dict(num_layers=1, d_ff=64, num_heads=2, d_kv=32))
    elif kind == "wan":
        options.update(umt5xxl_model_config=_t5(TEXT_WIDTH, vocab_size=256))
        tokenizer_data["spiece_model"] = tiny_spiece_model(bos_id=-1, eos_id=1, pad_id=0, unk_id=2)
    elif kind == "lumina2":  # Gemma-2: reads hidden layer -2, so >= 3 layers; head_dim is fixed at 256
        options.update(gemma2_2b_model_config=dict(vocab_size=256, hidden_size=TEXT_WIDTH, intermediate_size=128,
                                                   num_hidden_layers=3, num_attention_heads=1, num_key_value_heads=1))
        tokenizer_data["spiece_model"] = tiny_spiece_model(bos_id=2, eos_id=1, pad_id=0, unk_id=3)
    else:
        raise ValueError(f"unknown text encoder kind {kind!r}")
    return target, options, tokenizer_data


def build_text_encoder(family: str, seed: int = 0):
    """A ``comfy.sd.CLIP`` for the family with tiny random weights (``tokenize`` / ``encode_from_tokens`` work)."""
    import comfy.sd

    target, options, tokenizer_data = text_encoder_options(family)
    clip = comfy.sd.CLIP(target, tokenizer_data=tokenizer_data, model_options=options)
    clip.load_sd(random_state_dict(clip.cond_stage_model, seed), full_model=True)
    return clip


def build_flux_text_encoder_from_files(seed: int = 0):
    """Flux's CLIP through ``comfy.sd.load_text_encoder_state_dicts`` (DualCLIPLoader's path, type flux): one
    CLIP-L and one T5 state dict in the layout of the separate files, shrunk through ``model_options``.

    On this path ComfyUI (``long_clipl.model_options_long_clip``) *replaces* ``clip_l_model_config`` by
    ``model_options["model_config"]`` plus the file's ``max_position_embeddings``, so the CLIP-L shrink goes under
    ``"model_config"`` (a ``clip_l_model_config`` would be dropped and a full-width CLIP-L built)."""
    import comfy.sd
    import comfy.text_encoders.flux
    import torch

    _, options, _ = text_encoder_options("flux_dev")
    meta = comfy.text_encoders.flux.FluxClipModel(device="meta", dtype=torch.float32, model_options=options)
    clip_l = random_state_dict(meta.clip_l.transformer, seed)
    t5 = random_state_dict(meta.t5xxl.transformer, seed + 1)
    file_options = {k: v for k, v in options.items() if k != "clip_l_model_config"}
    file_options["model_config"] = dict(options["clip_l_model_config"])
    return comfy.sd.load_text_encoder_state_dicts([clip_l, t5], clip_type=comfy.sd.CLIPType.FLUX,
                                                  model_options=file_options)


# ------------------------------------------------------------------------------------------------ VAE

def taesd16_state_dict(seed: int = 0) -> dict:
    """A 16-channel TAESD (``taesd_encoder.*``, ``taesd_decoder.*``, neutral ``vae_scale``/``vae_shift``)."""
    import comfy.taesd.taesd
    import torch

    with torch.device("meta"):
        vae = comfy.taesd.taesd.TAESD(latent_channels=16)
    sd = random_state_dict(vae, seed)
    sd["vae_scale"] = torch.tensor(1.0)
    sd["vae_shift"] = torch.tensor(0.0)
    return sd


def build_taesd16_vae(seed: int = 0):
    """``comfy.sd.VAE`` over a 16-channel TAESD: encode (B,H,W,3) in [0,1] -> (B,16,H/8,W/8)."""
    import comfy.sd

    return comfy.sd.VAE(sd=taesd16_state_dict(seed))


# ------------------------------------------------------------------------------------------------ SD3 checkpoint

def sd3_checkpoint_state_dict(family: str = "sd35_medium", seed: int = 0) -> dict:
    """The state dict of a CheckpointLoaderSimple-loadable SD3 checkpoint (see ``build_sd3_checkpoint``)."""
    import comfy.text_encoders.sd3_clip
    import torch

    try:
        from . import tiny_checkpoints
    except ImportError:
        import tiny_checkpoints  # type: ignore[no-redef]

    if FAMILIES[family].config_class != "SD3":
        raise ValueError(f"{family} is not an SD3 layout; choose sd3, sd35_medium or sd35_large")
    mc = model_config(family)
    base = mc.get_model({}, device="meta")
    unet = random_state_dict(base.diffusion_model, seed)
    sd = mc.process_unet_state_dict_for_saving(unet)  # "model.diffusion_model." prefix
    sd.update({"first_stage_model." + k: v for k, v in taesd16_state_dict(seed + 1).items()})
    te = comfy.text_encoders.sd3_clip.SD3ClipModel(clip_l=True, clip_g=True, t5=False, device="meta",
                                                   dtype=torch.float16)
    te_sd = mc.process_clip_state_dict_for_saving(dict(te.state_dict()))  # "text_encoders.clip_l./clip_g."
    sd.update(tiny_checkpoints._shared_views(te_sd, torch.Generator().manual_seed(seed + 2)))
    return sd


def build_sd3_checkpoint(path: os.PathLike, family: str = "sd35_medium", seed: int = 0) -> Path:
    """Write (atomically) a ``.ckpt`` that ``comfy.sd.load_checkpoint_guess_config`` / CheckpointLoaderSimple
    detects as SD3: the tiny MMDiT of ``family``, full-size CLIP-L + CLIP-G stored as strided views of one small
    buffer (a few MB; T5 omitted, SD3ClipModel then runs without it) and a 16-channel TAESD."""
    try:
        from . import tiny_checkpoints
    except ImportError:
        import tiny_checkpoints  # type: ignore[no-redef]

    path = Path(path)
    tiny_checkpoints._atomic_torch_save({"state_dict": sd3_checkpoint_state_dict(family, seed)}, path)
    return path
