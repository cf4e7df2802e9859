"""HTTP routes the live panel reads (ComfyUI-facing; ComfyUI's ``server`` is imported only in register_routes).

    GET /loralab/runs/{run}/history          -> {"run", "history": read_history(run_dir), "latest": latest.json|null,
                                                 "estimate": estimate.txt|null}
    GET /loralab/runs/{run}/previews/{name}  -> the preview image <run_dir>/previews/<name>

ComfyUI also serves every route of ``PromptServer.instance.routes`` under ``/api`` (the browser uses
``api.fetchApi``/``api.apiURL``, i.e. ``/api/loralab/...``). Run ids and file names must match strict patterns (no
separators, no "..", no leading dot), and the resolved path must stay inside the runs root, so a request cannot
read anything outside it.

``register_routes()`` must run while ComfyUI loads custom nodes (from the pack's import or ``comfy_entrypoint``):
ComfyUI copies the route table into its web app right after loading nodes, and routes added later are never served.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional, Union

log = logging.getLogger("loralab")

# Run folder names come from nodes/paths.py sanitize_name (letters, digits, "._ -") plus "-<key>"; no separators.
RUN_ID_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9 _.-]{0,198}[A-Za-z0-9_.-])?$")
PREVIEW_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.(?:png|jpg|jpeg|webp)$", re.IGNORECASE)
HISTORY_PATH = "/loralab/runs/{run}/history"
PREVIEW_PATH = "/loralab/runs/{run}/previews/{name}"
_CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}

PathLike = Union[str, os.PathLike]
_registered = False


class NotFound(Exception):
    pass


class BadRequest(Exception):
    pass


# ------------------------------------------------------------------------------------------------------ runs root
def runs_root() -> Path:
    """Where run folders live: the one definition Train LoRA writes with (``nodes/paths.py``)."""
    from .paths import runs_root as the_runs_root

    return the_runs_root()


def valid_run_id(run: str) -> bool:
    """One folder name: starts with a letter/digit (so never "." or ".."), no separators, no control characters."""
    return isinstance(run, str) and RUN_ID_RE.fullmatch(run) is not None


def valid_preview_name(name: str) -> bool:
    return isinstance(name, str) and PREVIEW_NAME_RE.fullmatch(name) is not None and ".." not in name


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError):
        return False


def run_dir(run: str, root: Optional[PathLike] = None) -> Path:
    """The folder of run ``run``; raises BadRequest for an invalid id, NotFound when it does not exist."""
    if not valid_run_id(run):
        raise BadRequest("invalid run id")
    base = Path(root) if root is not None else runs_root()
    d = base / run
    if not _inside(base, d) or not d.is_dir():
        raise NotFound(f"no run {run!r}")
    return d


# ------------------------------------------------------------------------------------- handlers over a root dir
def _runlog_readers():
    try:  # inside ComfyUI the pack is a package: nodes/ and trainer/ are siblings
        from ..trainer.monitor.runlog import read_estimate, read_history, read_latest
    except ImportError:  # tests / tools with the repository root on sys.path
        from trainer.monitor.runlog import read_estimate, read_history, read_latest
    return read_history, read_latest, read_estimate


def history_payload(root: PathLike, run: str) -> dict:
    """What the history route returns (raises BadRequest / NotFound)."""
    read_history, read_latest, read_estimate = _runlog_readers()
    d = run_dir(run, root)
    return {"run": run, "history": read_history(d), "latest": read_latest(d), "estimate": read_estimate(d)}


def preview_file(root: PathLike, run: str, name: str) -> Path:
    """Path of a preview image (raises BadRequest / NotFound)."""
    if not valid_preview_name(name):
        raise BadRequest("invalid preview name")
    d = run_dir(run, root)
    previews = d / "previews"
    p = previews / name
    if not _inside(previews, p) or not p.is_file():
        raise NotFound(f"no preview {name!r} in run {run!r}")
    return p


def _error(web, status: int, message: str):
    return web.json_response({"error": message}, status=status, headers={"Cache-Control": "no-store"})


async def handle_history(request, root: Optional[PathLike] = None):
    """aiohttp handler: GET /loralab/runs/{run}/history."""
    from aiohttp import web

    run = request.match_info.get("run", "")
    base = Path(root) if root is not None else runs_root()
    try:
        data = history_payload(base, run)
    except BadRequest as e:
        return _error(web, 400, str(e))
    except NotFound as e:
        return _error(web, 404, str(e))
    body = json.dumps(data, separators=(",", ":"), default=str)
    return web.Response(text=body, content_type="application/json", headers={"Cache-Control": "no-store"})


async def handle_preview(request, root: Optional[PathLike] = None):
    """aiohttp handler: GET /loralab/runs/{run}/previews/{name}."""
    from aiohttp import web

    base = Path(root) if root is not None else runs_root()
    try:
        p = preview_file(base, request.match_info.get("run", ""), request.match_info.get("name", ""))
    except BadRequest as e:
        return _error(web, 400, str(e))
    except NotFound as e:
        return _error(web, 404, str(e))
    ctype = _CONTENT_TYPES.get(p.suffix.lower(), "application/octet-stream")
    return web.Response(body=p.read_bytes(), content_type=ctype, headers={"Cache-Control": "no-cache"})


def make_routes(root: Optional[Union[PathLike, Callable[[], PathLike]]] = None) -> list:
    """aiohttp RouteDefs for both routes. ``root``: a folder or a function returning one (default: runs_root,
    looked up per request)."""
    from aiohttp import web

    def current_root() -> Path:
        if root is None:
            return runs_root()
        return Path(root() if callable(root) else root)

    async def history(request):
        return await handle_history(request, current_root())

    async def preview(request):
        return await handle_preview(request, current_root())

    return [web.get(HISTORY_PATH, history), web.get(PREVIEW_PATH, preview)]


def register_routes(routes=None) -> bool:
    """Attach the routes to ComfyUI's ``PromptServer.instance.routes`` (or to ``routes``, any aiohttp
    RouteTableDef). Idempotent: a route already in the table is not added again. Returns True when it added
    something. Outside ComfyUI (no ``server`` module, no PromptServer instance) it does nothing."""
    global _registered
    into_comfy = routes is None
    if into_comfy:
        if _registered:
            return False
        # Only a running ComfyUI: main.py imports its server.py before loading custom nodes. Importing it from
        # anywhere else (a test process with this repository on sys.path) would run ComfyUI's `import nodes`.
        server = sys.modules.get("server")
        if server is None:
            log.debug("LoRA Lab: ComfyUI server not loaded; routes not registered")
            return False
        instance = getattr(getattr(server, "PromptServer", None), "instance", None)
        if instance is None:
            return False
        routes = instance.routes
        app = getattr(instance, "app", None)
        if app is not None and getattr(getattr(app, "router", None), "frozen", False):
            log.warning("LoRA Lab: ComfyUI's web server already started; the live-panel routes are not served "
                        "(register_routes() must run while custom nodes load)")
    existing = {(getattr(r, "method", None), getattr(r, "path", None)) for r in routes}
    added = False
    for rd in make_routes():
        if (rd.method, rd.path) not in existing:
            routes.route(rd.method, rd.path)(rd.handler)
            added = True
    if into_comfy:
        _registered = True
    return added
