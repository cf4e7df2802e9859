"""Fixtures for tests against a real ComfyUI (COMFYUI_PATH). Everything skips cleanly when it is not available.

Session fixtures (see harness.py / tiny_checkpoints.py for details):
  comfyui_path       Path of the ComfyUI checkout; skips with a clear reason when unset/unusable
                     (fails instead when LORALAB_REQUIRE_COMFYUI=1, for CI).
  tiny_checkpoints   {"sd15": Path, "sdxl": Path, "vae": Path}: cached tiny checkpoints (+ separate TAESD VAE file).
  comfy_server       a started harness.ComfyServer (headless, --cpu, temp base dir, our pack + test nodes linked,
                     checkpoints in models/checkpoints under their file names, TAESD file in models/vae).
  comfy              in-process ComfyUI (CPU mode): SimpleNamespace(mm, sd, utils, lora, model_base,
                     model_sampling, folder_paths, path).
  tiny_models        factory (kind, te_layers=3) -> (MODEL, CLIP, VAE) loaded in-process, cached per session; treat
                     the objects as read-only (clone() before patching).
  loralab_pack       this repository imported as a package (name "loralab_pack") next to in-process ComfyUI.
Function fixtures:
  comfy_ws           a harness.WSClient connected to comfy_server (pass comfy_ws.client_id to run_prompt).
"""
from __future__ import annotations

import os
import tempfile
import types
from pathlib import Path

import pytest

try:  # works whether or not tests/ is a package
    from . import harness, tiny_checkpoints
except ImportError:
    import harness  # type: ignore[no-redef]
    import tiny_checkpoints  # type: ignore[no-redef]


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    path, reason = harness.comfyui_path_or_reason()
    if path is None:
        if os.environ.get("LORALAB_REQUIRE_COMFYUI"):  # CI: a misconfigured ComfyUI must not pass as "skipped"
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return path


def _cache_dir(config) -> Path:
    env = os.environ.get("LORALAB_TINY_CKPT_DIR")
    if env:
        return Path(env)
    try:
        return Path(config.cache.mkdir("loralab-tiny-checkpoints"))
    except Exception:
        return Path(tempfile.gettempdir()) / "loralab-tiny-checkpoints"


@pytest.fixture(scope="session")
def tiny_checkpoint_cache(request, comfyui_path) -> Path:
    return _cache_dir(request.config)


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_checkpoint_cache, comfyui_path) -> dict:
    return harness.build_checkpoints_subprocess(tiny_checkpoint_cache, comfyui_path)


@pytest.fixture(scope="session")
def tiny_checkpoint_vpred(tiny_checkpoint_cache, comfyui_path) -> Path:
    """The SDXL v-prediction variant (built on first use: ~15 s, 215 MB)."""
    return harness.build_checkpoints_subprocess(tiny_checkpoint_cache, comfyui_path, kinds=["sdxl_vpred"])["sdxl_vpred"]


@pytest.fixture(scope="session")
def comfy_server(comfyui_path, tiny_checkpoints, tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy-base")
    ckpts = {p.name: p for k, p in tiny_checkpoints.items() if k != "vae"}
    vaes = {tiny_checkpoints["vae"].name: tiny_checkpoints["vae"]} if "vae" in tiny_checkpoints else {}
    server = harness.ComfyServer(comfyui_path, base, checkpoints=ckpts, vae_files=vaes)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def comfy_ws(comfy_server):
    client = comfy_server.ws_client()
    try:
        client.wait_for(lambda m: m.get("type") == "status", timeout=10)
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def comfy(comfyui_path):
    mm = harness.import_comfy(comfyui_path)
    import comfy.lora
    import comfy.model_base
    import comfy.model_sampling
    import comfy.sd
    import comfy.utils
    import folder_paths

    return types.SimpleNamespace(mm=mm, sd=comfy.sd, utils=comfy.utils, lora=comfy.lora,
                                 model_base=comfy.model_base, model_sampling=comfy.model_sampling,
                                 folder_paths=folder_paths, path=comfyui_path)


@pytest.fixture(scope="session")
def tiny_models(comfy, tiny_checkpoints, tiny_checkpoint_cache, comfyui_path):
    cache: dict = {}

    def load(kind: str = "sd15", te_layers: int | None = 3):
        key = (kind, te_layers)
        if key not in cache:
            if kind in tiny_checkpoints:
                path = tiny_checkpoints[kind]
            else:
                path = harness.build_checkpoints_subprocess(tiny_checkpoint_cache, comfyui_path, kinds=[kind])[kind]
            cache[key] = harness.load_tiny(path, te_layers=te_layers)
        return cache[key]

    return load


@pytest.fixture(scope="session")
def loralab_pack(comfy):
    return harness.import_pack("loralab_pack")
