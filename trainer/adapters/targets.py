"""Which modules carry adapters (target sets, with kohya semantics) and under which kohya name.

DiT families (SD3, Flux, ...) use :func:`dit_targets`: their blocks come from trainer/families.py. What follows is
the UNet rule (SD1.5/SDXL).

Presets, for a UNet:

* ``attention``   — to_q, to_k, to_v, to_out.0 of the attention layers inside transformer containers.
* ``transformer`` — every Linear and 1x1 Conv2d inside transformer containers (kohya's default: attn1/attn2 q/k/v/out,
  ff.net.0.proj, ff.net.2, proj_in, proj_out). SD1.5: 192 modules, SDXL: 722.
* ``full``        — transformer + every Linear/Conv2d inside resnet, downsample and upsample containers
  (kohya's LoCon / "C3Lier" set: time_emb_proj, 1x1 skip convs and the 3x3 convs; the 3x3 ones get the conv rank).

Containers are found by class name, per naming scheme (``diffusers``: Transformer2DModel, ResnetBlock2D,
Downsample2D, Upsample2D; ``ldm``, i.e. ComfyUI: SpatialTransformer, ResBlock, Downsample, Upsample), so the same
code serves the diffusers host and the ComfyUI host. Text encoders: the CLIP attention/MLP linears
(q_proj, k_proj, v_proj, out_proj, fc1, fc2) of every encoder layer, as kohya does.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional

from ..choices import TARGET_SETS
from ..hosts.base import AdapterTarget
from .kohya_names import DIFFUSERS_CLASSES, LDM_CLASSES, TE_PREFIXES, UNET_PREFIX, _kind_of, kohya_name, unet_namer

SCHEMES = {"diffusers": DIFFUSERS_CLASSES, "ldm": LDM_CLASSES}

_ATTENTION_LEAF = re.compile(r"(^|\.)attn\d+\.(to_q|to_k|to_v|to_out\.0)$")
_CLIP_LEAF = re.compile(r"(^|\.)encoder\.layers\.(\d+)\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")


def _is_adaptable(module) -> bool:
    from torch import nn

    return isinstance(module, (nn.Linear, nn.Conv2d))  # ComfyUI's ops subclass these


def is_conv3x3(module) -> bool:
    """A Conv2d whose kernel is not 1x1: it gets the conv rank (LoCon) instead of the linear rank."""
    from torch import nn

    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def select_unet_modules(root, targets: str, scheme: str = "diffusers",
                        include_conv3x3: bool = True) -> list[tuple[str, Any]]:
    """(module path, module) pairs for a target set, in module order. Paths are relative to ``root``."""
    if targets not in TARGET_SETS:
        raise ValueError(f"unknown network targets '{targets}' (choose one of: {', '.join(TARGET_SETS)})")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown UNet naming scheme '{scheme}' (use one of: {', '.join(SCHEMES)})")
    kinds = {"attention"} if targets != "full" else {"attention", "resnet", "down", "up"}
    picked: dict[str, Any] = {}
    for path, container in root.named_modules():
        if _kind_of(container, SCHEMES[scheme]) not in kinds:
            continue
        for child_path, child in container.named_modules():
            full = f"{path}.{child_path}" if path and child_path else (path or child_path)
            if not child_path or full in picked or not _is_adaptable(child):
                continue
            if targets == "attention" and not _ATTENTION_LEAF.search(full):
                continue
            if is_conv3x3(child) and (targets != "full" or not include_conv3x3):
                continue
            picked[full] = child
    return list(picked.items())


def unet_targets(unet, family: str, targets: str, scheme: str = "diffusers",
                 ldm_to_diffusers: Optional[Mapping[str, str]] = None,
                 include_conv3x3: bool = True) -> list[AdapterTarget]:
    """Adapter targets of a UNet under kohya names.

    scheme "diffusers": ``unet`` is a diffusers UNet2DConditionModel (its ``config`` gives the SDXL ldm names).
    scheme "ldm": ``unet`` is ComfyUI's ``model.model.diffusion_model``. For SD1.5 the kohya names are diffusers
    paths: pass ComfyUI's ``comfy.utils.unet_to_diffusers(unet_config)`` as ``ldm_to_diffusers`` (either
    orientation is accepted); without it the map is derived from the module tree.
    ``include_conv3x3=False`` keeps the "full" target set to its Linear and 1x1 convs.
    """
    name_of: Callable[[str], str] = unet_namer(
        family, scheme, config=getattr(unet, "config", None) if scheme == "diffusers" else None,
        ldm_root=unet if scheme == "ldm" else None, ldm_to_diffusers_map=ldm_to_diffusers)
    targets = [AdapterTarget(name_of(path), module, "unet")
               for path, module in select_unet_modules(unet, targets, scheme, include_conv3x3)]
    return _check_unique(targets)


_ATTENTION_PARENT = re.compile(r"(^|_)(attn\d*|attention)(_|$)")  # attn, attn2, img_attn, self_attn, attention


def select_dit_modules(root, family, targets: str) -> list[tuple[str, Any]]:
    """(path under ``root``, Linear) pairs of a DiT for a target set; ``family`` is a trainer.families.Family.

    ``transformer``: every Linear inside the family's blocks (kohya's default for SD3 and Flux; fused qkv Linears
    are one adapter each, as kohya trains them). ``attention``: those under a module named ``*attn*`` /
    ``*attention*`` plus the family's ``attention_extra``. ``full``: every Linear of the model, embedders and
    final layer included (patch-embedding convs stay out: ComfyUI's Conv3d patches cannot carry one).
    """
    from torch import nn

    if targets not in TARGET_SETS:
        raise ValueError(f"unknown network targets '{targets}' (choose one of: {', '.join(TARGET_SETS)})")
    if targets == "full":
        return [(p, m) for p, m in root.named_modules() if p and isinstance(m, nn.Linear)]
    picked = []
    for list_name in family.blocks:
        blocks = getattr(root, list_name, None)
        if blocks is None:
            continue
        for path, module in blocks.named_modules(prefix=list_name):
            if not isinstance(module, nn.Linear):
                continue
            parents = path.split(".")[2:-1]  # below "<list>.<index>", above the Linear itself
            if targets == "attention" and not (any(_ATTENTION_PARENT.search(p) for p in parents)
                                               or path.endswith(tuple(family.attention_extra))):
                continue
            picked.append((path, module))
    return picked


def dit_targets(root, family, targets: str) -> list[AdapterTarget]:
    """Adapter targets of a DiT named as kohya names SD3 and Flux: ``lora_unet_`` + the path with ``.`` -> ``_``."""
    return _check_unique([AdapterTarget(kohya_name(UNET_PREFIX, path), module, "unet")
                          for path, module in select_dit_modules(root, family, targets)])


def text_encoder_targets(te, prefix: str, path_prefix: str = "", component: Optional[str] = None
                         ) -> list[AdapterTarget]:
    """Adapter targets of an HF-CLIP-layout text encoder (``text_model.encoder.layers.N.self_attn.q_proj`` ...).

    Names are always ``<prefix>_text_model_encoder_layers_N_<leaf>`` (kohya), whether or not the module tree has the
    ``text_model`` level (transformers 5's CLIPTextModel does not).
    ``prefix`` is "lora_te" (SD1.5), "lora_te1" or "lora_te2" (SDXL). When ``te`` wraps the CLIP model under a path
    (ComfyUI: ``clip_l.transformer.text_model...``), pass that path as ``path_prefix`` (e.g. "transformer."): only
    modules under it are considered and it is stripped from the names.
    """
    components = {v: k for k, v in TE_PREFIXES.items()}
    if component is None:
        if prefix not in components:
            raise ValueError(f"unknown text encoder prefix '{prefix}' (use one of: {', '.join(components)})")
        component = components[prefix]
    if path_prefix and not path_prefix.endswith("."):
        path_prefix += "."
    targets = []
    for path, module in te.named_modules():
        if not path.startswith(path_prefix):
            continue
        match = _CLIP_LEAF.search(path[len(path_prefix):])
        if match and _is_adaptable(module):
            # Canonical HF-CLIP path whatever wraps the layers: transformers 5 dropped the `text_model.` level of
            # CLIPTextModel (CLIPTextModelWithProjection keeps it), but kohya/ComfyUI/diffusers keys always have it.
            canonical = f"text_model.encoder.layers.{match.group(2)}.{match.group(3)}"
            targets.append(AdapterTarget(kohya_name(prefix, canonical), module, component))
    return _check_unique(targets)


def _check_unique(targets: list[AdapterTarget]) -> list[AdapterTarget]:
    seen: dict[str, int] = {}
    for t in targets:
        seen[t.name] = seen.get(t.name, 0) + 1
    dupes = [n for n, c in seen.items() if c > 1]
    if dupes:
        raise ValueError(f"two modules map to the same LoRA name: {dupes[0]}")
    return targets


def all_text_encoder_targets(encoders: dict) -> list[AdapterTarget]:
    """Targets of every text encoder of a model, keyed by component ("te", or "te1"/"te2" for SDXL)."""
    targets: list[AdapterTarget] = []
    for component, encoder in encoders.items():
        targets += text_encoder_targets(encoder, TE_PREFIXES[component], component=component)
    return targets
