"""Tiny random-weight checkpoints that ComfyUI's CheckpointLoaderSimple detects as SD1.5 and SDXL-family models.

Import this in a process where ComfyUI is importable (``sys.path`` contains ``COMFYUI_PATH``; see
``harness.import_comfy``). Everything is built with ComfyUI's own classes (``UNetModel`` with ``comfy.ops``,
``SD1ClipModel`` / ``SDXLClipModel``, ``TAESD``) and written in the layout ComfyUI's own CheckpointSave writes
(``model_config.process_*_state_dict_for_saving``), so detection follows the real code path.

Kinds (``KINDS``):
  sd15        detected as ``SD15`` -> ``model_base.BaseModel``, EPS. UNet: 2 levels of width 320
              (channel_mult [1, 1], one res block per level, attention at level 0 and in the middle block).
  sdxl        detected as ``Segmind_Vega`` (an SDXL-family config) -> ``model_base.SDXL``, EPS. UNet keeps real
              SDXL's block indices (3 levels x 2 res blocks; attention in input blocks 4,5,7,8, the middle block and
              output blocks 0-5), all at width 320 and transformer depth 1-2 (detection needs [0,0,1,1,2,2]).
  sdxl_vpred  the same weights plus the ``v_pred`` marker key -> ``model_base.SDXL``, V_PREDICTION.
UNet and VAE weights are independent random tensors (stored fp16; ComfyUI computes in fp32 on CPU).
VAE: TAESD (``first_stage_model.taesd_encoder.*`` / ``taesd_decoder.*``, ``vae_scale`` = 1, ``vae_shift`` = 0) inside the
checkpoint; ComfyUI's VAE class detects it from ``taesd_decoder.1.weight`` the same way for a checkpoint and for a
separate file, and ``ensure_checkpoints`` also writes ``loralab_tiny_taesd.safetensors`` for VAELoader tests.

Text encoders: ComfyUI builds CLIP-L (SD1.5) and CLIP-L + OpenCLIP-G (SDXL) from fixed JSON configs; a checkpoint
cannot shrink them (a different shape fails to load; missing layers stay uninitialised memory; a config override
only exists as ``te_model_options`` of ``load_checkpoint_guess_config``, which CheckpointLoaderSimple never passes).
So the text encoders here are full size, but stored cheaply: the file is a ``torch.save`` pickle (ComfyUI loads
``.ckpt`` with ``weights_only=True``) and every text-encoder tensor is a strided *view* of one small random buffer
(2-D weights are Hankel matrices ``W[r, c] = buf[offset + r + c]``: full rank, rows pairwise uncorrelated), so the
~0.8 G text-encoder parameters take a few MB on disk. ComfyUI copies them into its own modules on load
(``load_state_dict`` copies), so nothing downstream sees the sharing. Different prompts give different embeddings.

Files are cached under ``<cache_dir>/<cache_key()>/``; ``cache_key`` covers ``VERSION`` and the ComfyUI version,
so a changed builder or ComfyUI rebuilds, and repeated test runs reuse the files. Writes are atomic.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

VERSION = "1"  # bump whenever a layout, size or initialisation below changes
KINDS = ("sd15", "sdxl", "sdxl_vpred")
DEFAULT_KINDS = ("sd15", "sdxl")

_SD15_UNET = dict(
    context_dim=768, model_channels=320, use_linear_in_transformer=False, adm_in_channels=None,
    use_temporal_attention=False, use_temporal_resblock=False, in_channels=4, out_channels=4,
    num_res_blocks=[1, 1], channel_mult=[1, 1], transformer_depth=[1, 0], transformer_depth_output=[0, 0, 1, 1],
    transformer_depth_middle=1,
)
_SDXL_UNET = dict(
    context_dim=2048, model_channels=320, use_linear_in_transformer=True, adm_in_channels=2816,
    num_classes="sequential", use_temporal_attention=False, use_temporal_resblock=False, in_channels=4,
    out_channels=4, num_res_blocks=[2, 2, 2], channel_mult=[1, 1, 1], transformer_depth=[0, 0, 1, 1, 2, 2],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
)
_COMMON_UNET = dict(image_size=32, use_spatial_transformer=True, legacy=False, use_checkpoint=False)

SPECS = {
    "sd15": dict(config="SD15", unet=_SD15_UNET, model_class="BaseModel", model_type="EPS", clip="sd1",
                 latent_scale=0.18215, context_dim=768, pooled_dim=768),
    "sdxl": dict(config="Segmind_Vega", unet=_SDXL_UNET, model_class="SDXL", model_type="EPS", clip="sdxl",
                 latent_scale=0.13025, context_dim=2048, pooled_dim=1280),
    "sdxl_vpred": dict(config="Segmind_Vega", unet=_SDXL_UNET, model_class="SDXL", model_type="V_PREDICTION",
                       clip="sdxl", latent_scale=0.13025, context_dim=2048, pooled_dim=1280, extra_keys=("v_pred",)),
}


def checkpoint_filename(kind: str) -> str:
    return f"loralab_tiny_{kind}.ckpt"


VAE_FILENAME = "loralab_tiny_taesd.safetensors"


def _comfy_version() -> str:
    try:
        import comfyui_version  # ComfyUI's root module (present since 2024)

        return str(comfyui_version.__version__)
    except Exception:
        import comfy

        return "unknown-" + str(abs(hash(os.path.dirname(comfy.__file__))))


def cache_key() -> str:
    return f"v{VERSION}-comfyui{_comfy_version()}"


def default_cache_dir() -> Path:
    env = os.environ.get("LORALAB_TINY_CKPT_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / "loralab-tiny-checkpoints"


def _require_comfy():
    if "comfy.model_management" not in sys.modules:
        # Force CPU before model_management is imported (it picks the device at import time).
        from comfy.cli_args import args

        args.cpu = True
    import comfy.model_management  # noqa: F401


# ---------------------------------------------------------------------------------------------------------------
# initialisation

def _init_module_(module, gen) -> None:
    """Small random init of every parameter and floating buffer (comfy.ops leave them uninitialised).

    Weights (ndim >= 2): N(0, 1/fan_in) (variance preserving, so outputs are O(1) and vary with the input);
    1-D ``*.weight`` (norm scales): 1 + N(0, 0.02); biases and everything else: N(0, 0.02).
    """
    import torch

    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.is_floating_point():
                continue
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
            elif p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.02 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


def _shared_views(meta_sd: dict, gen) -> dict:
    """Replace meta tensors by strided views of two shared random buffers (see module docstring)."""
    import torch

    shapes = [t.shape for t in meta_sd.values() if t.device.type == "meta"]
    need = max((sum(s) if len(s) else 1) for s in shapes) if shapes else 1
    span = 1 << 20
    noise = (0.02 * torch.randn(span + need, generator=gen)).half()
    ones = (1.0 + 0.02 * torch.randn(span + need, generator=gen)).half()
    out = {}
    for k, t in meta_sd.items():
        if t.device.type != "meta":
            out[k] = t
            continue
        is_norm_scale = t.ndim == 1 and k.endswith(".weight") and ("norm" in k or ".ln_" in k)
        buf = ones if is_norm_scale else noise
        offset = int(torch.randint(0, span, (1,), generator=gen))
        if t.ndim == 0:
            out[k] = buf[offset].clone()
        else:
            out[k] = buf.as_strided(tuple(t.shape), (1,) * t.ndim, offset)
    return out


# ---------------------------------------------------------------------------------------------------------------
# builders

def _model_config(kind: str):
    import comfy.supported_models as sm

    spec = SPECS[kind]
    cfg = dict(_COMMON_UNET, **spec["unet"])
    return getattr(sm, spec["config"])(cfg)


def _unet_state_dict(kind: str, gen) -> dict:
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    mc = _model_config(kind)
    unet = UNetModel(**mc.unet_config, device="cpu", dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    _init_module_(unet, gen)
    sd = {k: v.detach().half() for k, v in unet.state_dict().items()}
    return mc.process_unet_state_dict_for_saving(sd)  # adds the "model.diffusion_model." prefix


def _taesd_state_dict(gen) -> dict:
    import comfy.taesd.taesd
    import torch

    vae = comfy.taesd.taesd.TAESD(latent_channels=4)
    _init_module_(vae, gen)
    sd = {k: v.detach().half() for k, v in vae.state_dict().items()}
    # encode() divides by vae_scale: keep the neutral values exactly.
    sd["vae_scale"] = torch.tensor(1.0)
    sd["vae_shift"] = torch.tensor(0.0)
    return sd


def _clip_state_dict(kind: str, gen) -> dict:
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import torch

    mc = _model_config(kind)
    if SPECS[kind]["clip"] == "sd1":
        te = comfy.sd1_clip.SD1ClipModel(device="meta", dtype=torch.float16)
    else:
        te = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16)
    meta_sd = te.state_dict()
    saved = mc.process_clip_state_dict_for_saving(dict(meta_sd))  # key layout exactly as CheckpointSave writes
    return _shared_views(saved, gen)


def build_state_dict(kind: str, seed: int = 0) -> dict:
    import torch

    _require_comfy()
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    sd.update(_unet_state_dict(kind, gen))
    sd.update({"first_stage_model." + k: v for k, v in _taesd_state_dict(gen).items()})
    sd.update(_clip_state_dict(kind, gen))
    for k in SPECS[kind].get("extra_keys", ()):
        sd[k] = torch.tensor([])
    return sd


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_checkpoint(kind: str, path: os.PathLike, seed: int = 0) -> dict:
    """Build one checkpoint file; returns {"kind", "path", "bytes", "seconds", "unet_params", "te_params"}."""
    if kind not in SPECS:
        raise ValueError(f"unknown tiny checkpoint kind {kind!r}; choose one of {KINDS}")
    t0 = time.perf_counter()
    sd = build_state_dict(kind, seed)
    path = Path(path)
    _atomic_torch_save({"state_dict": sd}, path)
    unet = sum(v.numel() for k, v in sd.items() if k.startswith("model.diffusion_model."))
    te = sum(v.numel() for k, v in sd.items() if k.startswith(("cond_stage_model.", "conditioner.")))
    return {"kind": kind, "path": str(path), "bytes": path.stat().st_size, "seconds": time.perf_counter() - t0,
            "unet_params": unet, "te_params": te}


def build_vae_file(path: os.PathLike, seed: int = 0) -> dict:
    """A separate TAESD VAE file (safetensors), loadable by VAELoader from models/vae."""
    import safetensors.torch
    import torch

    _require_comfy()
    t0 = time.perf_counter()
    sd = {k: v.contiguous() for k, v in _taesd_state_dict(torch.Generator().manual_seed(seed + 1)).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file(sd, str(tmp))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return {"kind": "vae", "path": str(path), "bytes": path.stat().st_size, "seconds": time.perf_counter() - t0}


def ensure_checkpoints(cache_dir: os.PathLike | None = None, kinds=DEFAULT_KINDS, vae: bool = True) -> dict:
    """Build the missing files (cached by ``cache_key()``); returns {kind: Path} (+ "vae": Path if vae)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / cache_key()
    out = {}
    log = []
    for kind in kinds:
        path = folder / checkpoint_filename(kind)
        if not path.exists():
            log.append(build_checkpoint(kind, path))
        out[kind] = path
    if vae:
        path = folder / VAE_FILENAME
        if not path.exists():
            log.append(build_vae_file(path))
        out["vae"] = path
    if log:
        with open(folder / "build_log.jsonl", "a") as f:
            for entry in log:
                f.write(json.dumps(entry) + "\n")
    return out


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build the tiny ComfyUI test checkpoints")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (default $COMFYUI_PATH)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--cache-dir", default=None,
                       help="build only what is missing under <cache-dir>/<cache_key()> (default: the test cache)")
    group.add_argument("--out", default=None, help="always (re)build into this folder")
    ap.add_argument("--kinds", nargs="+", default=None, choices=KINDS)
    args = ap.parse_args(argv)
    if not args.comfyui:
        ap.error("--comfyui or COMFYUI_PATH is required")
    sys.path.append(os.path.abspath(args.comfyui))
    _require_comfy()
    if args.out:
        folder = Path(args.out)
        for kind in args.kinds or KINDS:
            print(json.dumps(build_checkpoint(kind, folder / checkpoint_filename(kind))), flush=True)
        print(json.dumps(build_vae_file(folder / VAE_FILENAME)), flush=True)
        return 0
    paths = ensure_checkpoints(args.cache_dir, kinds=tuple(args.kinds or DEFAULT_KINDS))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
