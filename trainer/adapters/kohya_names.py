"""kohya-format LoRA module names, exactly as kohya sd-scripts writes them.

A name is ``<prefix>_<module path with "." replaced by "_">``:

* UNet prefix ``lora_unet``. **SD1.5 uses diffusers module paths** (kohya trains SD1.x on a diffusers-layout UNet):
  ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``. **SDXL uses the original ldm/sgm paths**
  (kohya trains SDXL on its own sgm-layout UNet): ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``.
* Text encoders: ``lora_te`` (SD1.5), ``lora_te1`` / ``lora_te2`` (SDXL), from HF-CLIP paths
  (``text_model.encoder.layers.N.self_attn.q_proj``).

So each host needs one direction of the diffusers <-> ldm UNet path map: the diffusers host on SDXL needs
diffusers -> ldm, the ComfyUI host (whose UNet is ldm-layout) on SD1.5 needs ldm -> diffusers. Both are computed here
from the block layout (layers per block, which levels have attention), which comes either from a diffusers UNet
config or from an ldm module tree. ComfyUI's own ``comfy.utils.unet_to_diffusers`` map is accepted too
(:func:`normalize_ldm_map`). No ComfyUI import, no torch import at module level.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

UNET_PREFIX = "lora_unet"
TE_PREFIXES = {"te": "lora_te", "te1": "lora_te1", "te2": "lora_te2"}

# Class names of the UNet containers in ComfyUI's ldm UNet (comfy/ldm/modules/diffusionmodules/openaimodel.py,
# comfy/ldm/modules/attention.py) and in kohya's sgm UNet. Subclasses are matched through their MRO.
LDM_CLASSES = {"resnet": ("ResBlock",), "attention": ("SpatialTransformer",), "down": ("Downsample",),
               "up": ("Upsample",)}
DIFFUSERS_CLASSES = {"resnet": ("ResnetBlock2D",), "attention": ("Transformer2DModel",), "down": ("Downsample2D",),
                     "up": ("Upsample2D",)}

# Inside a container, diffusers name -> ldm name. Transformer internals are named the same in both layouts.
INNER_DIFFUSERS_TO_LDM = {
    "resnet": {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"},
    "attention": {},
    "down": {"conv": "op"},
    "up": {"conv": "conv"},
}
# Modules outside the block structure.
TOP_DIFFUSERS_TO_LDM = {
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
}
_DIFFUSERS_ROOTS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "conv_norm_out",
                    "time_embedding", "add_embedding", "class_embedding")


def kohya_name(prefix: str, module_path: str) -> str:
    """``lora_unet`` + ``a.b.c`` -> ``lora_unet_a_b_c``."""
    return f"{prefix}_{module_path.replace('.', '_')}" if module_path else prefix


# --- block layout ---------------------------------------------------------------------------------------------------

def _get(config: Any, key: str, default=None):
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def block_map(config: Any) -> dict[str, tuple[str, str]]:
    """diffusers container path -> (ldm container path, kind), from a UNet2DConditionModel config.

    kind is "resnet", "attention", "down" or "up". Indexing (per level l with L layers, ldm numbering):
    input_blocks[1 + l*(L+1) + j] holds resnet j (.0) and its transformer (.1); the downsampler of level l sits
    alone at input_blocks[(l+1)*(L+1)] (.0); middle_block is resnet / transformer / resnet; output_blocks count
    L+1 per up level, and an up level's upsampler sits in its last output block after the resnet (and transformer).
    """
    down_types = list(_get(config, "down_block_types"))
    up_types = list(_get(config, "up_block_types"))
    lpb = _get(config, "layers_per_block")
    layers = list(lpb) if isinstance(lpb, (list, tuple)) else [int(lpb)] * len(down_types)
    if len(layers) != len(down_types) or len(up_types) != len(down_types):
        raise ValueError("UNet config: down_block_types, up_block_types and layers_per_block disagree in length")
    out: dict[str, tuple[str, str]] = {}
    n = len(down_types)
    index = 1
    for level, kind in enumerate(down_types):
        has_attn = "Attn" in kind
        for j in range(layers[level]):
            out[f"down_blocks.{level}.resnets.{j}"] = (f"input_blocks.{index}.0", "resnet")
            if has_attn:
                out[f"down_blocks.{level}.attentions.{j}"] = (f"input_blocks.{index}.1", "attention")
            index += 1
        if level != n - 1:
            out[f"down_blocks.{level}.downsamplers.0"] = (f"input_blocks.{index}.0", "down")
            index += 1
    mid_type = _get(config, "mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type:
        out["mid_block.resnets.0"] = ("middle_block.0", "resnet")
        if "CrossAttn" in mid_type:
            out["mid_block.attentions.0"] = ("middle_block.1", "attention")
            out["mid_block.resnets.1"] = ("middle_block.2", "resnet")
        else:
            out["mid_block.resnets.1"] = ("middle_block.1", "resnet")
    index = 0
    for level, kind in enumerate(up_types):
        has_attn = "Attn" in kind
        count = list(reversed(layers))[level] + 1
        for j in range(count):
            out[f"up_blocks.{level}.resnets.{j}"] = (f"output_blocks.{index}.0", "resnet")
            if has_attn:
                out[f"up_blocks.{level}.attentions.{j}"] = (f"output_blocks.{index}.1", "attention")
            if j == count - 1 and level != n - 1:
                out[f"up_blocks.{level}.upsamplers.0"] = (f"output_blocks.{index}.{2 if has_attn else 1}", "up")
            index += 1
    return out


def _kind_of(module, classes: Mapping[str, tuple[str, ...]]) -> Optional[str]:
    names = {c.__name__ for c in type(module).__mro__}
    for kind, class_names in classes.items():
        if names.intersection(class_names):
            return kind
    return None


def config_from_ldm(root) -> dict[str, Any]:
    """Recover the block layout (as diffusers config keys) from an ldm UNet module tree (ComfyUI's UNetModel)."""
    def kinds(block) -> set:
        return {_kind_of(child, LDM_CLASSES) for child in block.children()}

    def levels(blocks, boundary: str):
        found, layers, attn = [], 0, False
        for block in blocks:
            ks = kinds(block)
            if boundary == "down" and "down" in ks:  # a downsampler sits alone after its level
                found.append((layers, attn))
                layers, attn = 0, False
                continue
            layers += 1
            attn = attn or "attention" in ks
            if boundary == "up" and "up" in ks:  # an upsampler closes its level
                found.append((layers, attn))
                layers, attn = 0, False
        if layers:
            found.append((layers, attn))
        return found

    for attr in ("input_blocks", "middle_block", "output_blocks"):
        if not hasattr(root, attr):
            raise ValueError(f"not an ldm UNet: it has no '{attr}' (is this a diffusers UNet? use scheme='diffusers')")
    down = levels(list(root.input_blocks.children())[1:], "down")
    up = levels(list(root.output_blocks.children()), "up")
    if [layers for layers, _ in up] != [layers + 1 for layers, _ in reversed(down)]:
        raise ValueError("ldm UNet: input and output blocks do not mirror each other; cannot map names")
    mid_kinds = {k for block in [root.middle_block] for k in kinds(block)}
    return {
        "layers_per_block": [layers for layers, _ in down],
        "down_block_types": ["CrossAttnDownBlock2D" if attn else "DownBlock2D" for _, attn in down],
        "up_block_types": ["CrossAttnUpBlock2D" if attn else "UpBlock2D" for _, attn in up],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if "attention" in mid_kinds else "UNetMidBlock2D",
    }


# --- path conversion ------------------------------------------------------------------------------------------------

def _rename_inner(rest: str, table: Mapping[str, str]) -> str:
    """Rename the leading part of a path inside a container (longest table key that is a path prefix)."""
    for key in sorted(table, key=len, reverse=True):
        if rest == key or rest.startswith(key + "."):
            return table[key] + rest[len(key):]
    return rest


def _split_container(path: str, containers: Mapping[str, Any]) -> Optional[tuple[str, str]]:
    parts = path.split(".")
    for k in (4, 3, 2):  # down_blocks.0.resnets.0 | input_blocks.1.0, mid_block.resnets.0 | middle_block.1
        head = ".".join(parts[:k])
        if head in containers:
            return head, ".".join(parts[k:])
    return None


def diffusers_to_ldm(path: str, blocks: Mapping[str, tuple[str, str]]) -> str:
    """A diffusers UNet module path -> the ldm path of the same module (``blocks`` from :func:`block_map`)."""
    for top, ldm in TOP_DIFFUSERS_TO_LDM.items():
        if path == top or path.startswith(top + "."):
            return ldm + path[len(top):]
    split = _split_container(path, blocks)
    if split is None:
        raise KeyError(f"no ldm name for UNet module '{path}'")
    head, rest = split
    ldm_head, kind = blocks[head]
    rest = _rename_inner(rest, INNER_DIFFUSERS_TO_LDM[kind])
    return f"{ldm_head}.{rest}" if rest else ldm_head


def ldm_to_diffusers(path: str, blocks: Mapping[str, tuple[str, str]]) -> str:
    """An ldm UNet module path -> the diffusers path of the same module (inverse of :func:`diffusers_to_ldm`)."""
    for top, ldm in TOP_DIFFUSERS_TO_LDM.items():
        if path == ldm or path.startswith(ldm + "."):
            return top + path[len(ldm):]
    inverse = {ldm: (diff, kind) for diff, (ldm, kind) in blocks.items()}
    split = _split_container(path, inverse)
    if split is None:
        raise KeyError(f"no diffusers name for UNet module '{path}'")
    head, rest = split
    diff_head, kind = inverse[head]
    rest = _rename_inner(rest, {v: k for k, v in INNER_DIFFUSERS_TO_LDM[kind].items()})
    return f"{diff_head}.{rest}" if rest else diff_head


def normalize_ldm_map(mapping: Mapping[str, str]) -> dict[str, str]:
    """ldm module path -> diffusers module path, from either orientation, with or without .weight/.bias suffixes.

    Accepts ComfyUI's ``comfy.utils.unet_to_diffusers(unet_config)`` as is (diffusers weight key -> ldm weight key).
    """
    out: dict[str, str] = {}
    for a, b in mapping.items():
        for suffix in (".weight", ".bias"):
            if a.endswith(suffix) and b.endswith(suffix):
                a, b = a[: -len(suffix)], b[: -len(suffix)]
                break
        if a.split(".")[0] in _DIFFUSERS_ROOTS and b.split(".")[0] not in _DIFFUSERS_ROOTS:
            a, b = b, a
        out.setdefault(a, b)
    return out


# --- namers ---------------------------------------------------------------------------------------------------------

def unet_namer(family: str, scheme: str, *, config: Any = None, ldm_root=None,
               ldm_to_diffusers_map: Optional[Mapping[str, str]] = None) -> Callable[[str], str]:
    """Return ``name_of(module_path) -> kohya name`` for a UNet in the given naming scheme.

    family "sd15": kohya names use diffusers paths; family "sdxl": ldm paths. scheme says which layout the
    module paths passed to ``name_of`` are in ("diffusers": give ``config``; "ldm": give ``ldm_root`` and/or
    ``ldm_to_diffusers_map``).
    """
    if scheme not in ("diffusers", "ldm"):
        raise ValueError(f"unknown UNet naming scheme '{scheme}' (use 'diffusers' or 'ldm')")
    if family not in ("sd15", "sdxl"):
        raise ValueError(f"no kohya naming rule for model family '{family}' yet (supported: sd15, sdxl)")

    if (family, scheme) in (("sd15", "diffusers"), ("sdxl", "ldm")):
        return lambda path: kohya_name(UNET_PREFIX, path)
    if scheme == "diffusers":  # SDXL on a diffusers UNet -> ldm names
        if config is None:
            raise ValueError("SDXL kohya names from a diffusers UNet need the UNet config")
        blocks = block_map(config)
        return lambda path: kohya_name(UNET_PREFIX, diffusers_to_ldm(path, blocks))
    # SD1.5 on an ldm UNet (ComfyUI) -> diffusers names
    given = normalize_ldm_map(ldm_to_diffusers_map) if ldm_to_diffusers_map else {}
    derived = block_map(config_from_ldm(ldm_root)) if ldm_root is not None else None
    if not given and derived is None:
        raise ValueError("SD1.5 kohya names from an ldm UNet need the UNet module or an ldm->diffusers name map")

    def name_of(path: str) -> str:
        if path in given:
            return kohya_name(UNET_PREFIX, given[path])
        if derived is None:
            raise KeyError(f"UNet module '{path}' is not in the ldm->diffusers name map")
        return kohya_name(UNET_PREFIX, ldm_to_diffusers(path, derived))

    return name_of
