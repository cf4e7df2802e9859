"""Test harness for running LoRA Lab against a real ComfyUI checkout (``COMFYUI_PATH``).

Two ways in:
* **Server** (``ComfyServer``): ``python main.py --cpu`` headless on 127.0.0.1 with a temporary base directory
  (models/, input/, output/, user/, custom_nodes/), the tiny checkpoints linked into models/checkpoints, and this
  repository linked into custom_nodes as ``comfyui-lora-lab`` (plus the test-only pack ``tests/comfy/test_nodes``
  as ``loralab_test_nodes``). ``--disable-all-custom-nodes --whitelist-custom-nodes`` keeps other packs out.
  HTTP helpers (``run_prompt``, ``interrupt``, ...) use only the stdlib; ``WSClient`` is a stdlib websocket client.
* **In-process** (``import_comfy``, ``load_tiny``, ``import_pack``): ComfyUI's ``comfy.*`` modules imported in the
  test process in CPU mode, for fast unit-level tests of the ComfyUI host.

This module imports nothing from ComfyUI or torch at import time, so it is safe to import when ComfyUI is absent.
"""
from __future__ import annotations

import base64
import importlib
import importlib.util
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_NODES_DIR = Path(__file__).resolve().parent / "test_nodes"
PACK_FOLDER_NAME = "comfyui-lora-lab"          # our pack's folder name inside custom_nodes (= its module name)
TEST_PACK_FOLDER_NAME = "loralab_test_nodes"  # test-only nodes (tests/comfy/test_nodes)

SKIP_UNSET = ("COMFYUI_PATH not set: ComfyUI integration tests need a ComfyUI checkout with its requirements "
              "installed (see tests/comfy/SETUP.md)")


# ------------------------------------------------------------------------------------------------ discovery

def comfyui_path_or_reason() -> tuple[Optional[Path], str]:
    """(path, "") when COMFYUI_PATH points at a usable ComfyUI checkout, else (None, reason to skip)."""
    raw = os.environ.get("COMFYUI_PATH", "").strip()
    if not raw:
        return None, SKIP_UNSET
    path = Path(raw).expanduser().resolve()
    missing = [p for p in ("main.py", "nodes.py", "folder_paths.py", "comfy/sd.py") if not (path / p).is_file()]
    if missing:
        return None, (f"COMFYUI_PATH={raw} is not a ComfyUI checkout (missing {', '.join(missing)}): ComfyUI "
                      "integration tests need a ComfyUI checkout with its requirements installed")
    for mod in ("torch", "aiohttp", "safetensors", "einops", "torchsde", "transformers", "sqlalchemy"):
        if importlib.util.find_spec(mod) is None:
            return None, (f"COMFYUI_PATH is set but this Python ({sys.executable}) lacks ComfyUI's requirement "
                          f"'{mod}': install {path / 'requirements.txt'} (see tests/comfy/SETUP.md)")
    return path, ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ in-process

def import_comfy(comfyui_path: os.PathLike):
    """Make ComfyUI importable in this process, in CPU mode, and return ``comfy.model_management``.

    COMFYUI_PATH is *appended* to sys.path so that our own top-level ``nodes`` package is not shadowed by ComfyUI's
    ``nodes.py`` (comfy.sd / model_management / utils / lora / folder_paths do not import ``nodes``; the full node
    graph is for the server fixture). ``args.cpu`` must be set before ``comfy.model_management`` is first imported:
    it chooses the device at import time.
    """
    path = str(Path(comfyui_path).resolve())
    if path not in sys.path:
        sys.path.append(path)
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args  # parses no command line unless comfy.options.enable_args_parsing()

        args.cpu = True
    import comfy.model_management as mm

    if not mm.cpu_mode():
        raise RuntimeError("comfy.model_management was imported before import_comfy() could force CPU mode")
    return mm


def load_tiny(ckpt_path: os.PathLike, te_layers: Optional[int] = None):
    """Load a tiny checkpoint with ComfyUI's own loader: returns (MODEL ModelPatcher, CLIP, VAE).

    te_layers: None loads the full-size text encoders (as CheckpointLoaderSimple does); an int builds CLIP-L/G with
    only that many transformer layers (``te_model_options`` "clip_l_model_config"/"clip_g_model_config"), which
    is ~10x faster to encode on CPU. SDXL uses the penultimate layer, so te_layers must be >= 3.
    """
    import comfy.sd

    te_opts = {}
    if te_layers:
        te_opts = {"clip_l_model_config": {"num_hidden_layers": int(te_layers)},
                   "clip_g_model_config": {"num_hidden_layers": int(te_layers)}}
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(ckpt_path), output_vae=True, output_clip=True, te_model_options=te_opts)
    return model, clip, vae


def import_pack(name: str = "loralab_pack"):
    """Import this repository as a package the way ComfyUI does (folder = package, relative imports work).

    Use ``importlib.import_module(f"{name}.nodes.comfy_host")`` afterwards; never ``import nodes`` next to ComfyUI.
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


# ------------------------------------------------------------------------------------------------ errors

class ComfyError(RuntimeError):
    """Base class for failures reported by the ComfyUI server."""


class PromptRejected(ComfyError):
    """POST /prompt answered 400 (validation failed)."""

    def __init__(self, body: dict):
        self.body = body
        err = body.get("error", {})
        lines = [f"prompt rejected: {err.get('message', err)} {err.get('details', '')}".rstrip()]
        for node_id, ne in (body.get("node_errors") or {}).items():
            for e in ne.get("errors", []):
                lines.append(f"  node {node_id} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
        super().__init__("\n".join(lines))


class PromptFailed(ComfyError):
    """The prompt ran and a node raised; ``info`` is ComfyUI's execution_error payload."""

    def __init__(self, info: dict, log_tail: str = ""):
        self.info = info
        self.exception_message = info.get("exception_message", "")
        self.node_id = info.get("node_id")
        self.node_type = info.get("node_type")
        tb = "".join(info.get("traceback") or [])
        msg = (f"node {self.node_id} ({self.node_type}) failed: {info.get('exception_type')}: "
               f"{self.exception_message}\n{tb}")
        if log_tail:
            msg += f"\n--- server log tail ---\n{log_tail}"
        super().__init__(msg)


class PromptInterrupted(ComfyError):
    def __init__(self, info: dict):
        self.info = info
        super().__init__(f"prompt interrupted at node {info.get('node_id')} ({info.get('node_type')})")


# ------------------------------------------------------------------------------------------------ server

class ComfyServer:
    """A headless ComfyUI server in a subprocess with its own temporary base directory.

    base_dir layout: models/{checkpoints,vae,loras,...}, input/, output/, temp/, user/, custom_nodes/, server.log.
    """

    def __init__(self, comfyui_path: os.PathLike, base_dir: os.PathLike, *, python: str = sys.executable,
                 port: Optional[int] = None, checkpoints: Optional[dict] = None, vae_files: Optional[dict] = None,
                 link_pack: bool = True, link_test_nodes: bool = True, extra_args: tuple = (),
                 env: Optional[dict] = None):
        self.comfyui_path = Path(comfyui_path).resolve()
        self.base_dir = Path(base_dir).resolve()
        self.python = python
        self.port = port
        self.extra_args = tuple(extra_args)
        self.env = env
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.base_dir / "server.log"
        self._log_file = None
        self.models_dir = self.base_dir / "models"
        self.input_dir = self.base_dir / "input"
        self.output_dir = self.base_dir / "output"
        self.custom_nodes_dir = self.base_dir / "custom_nodes"
        for d in (self.models_dir / "checkpoints", self.models_dir / "vae", self.models_dir / "loras",
                  self.input_dir, self.output_dir, self.custom_nodes_dir, self.base_dir / "user"):
            d.mkdir(parents=True, exist_ok=True)
        for name, src in (checkpoints or {}).items():
            self._link(Path(src), self.models_dir / "checkpoints" / name)
        for name, src in (vae_files or {}).items():
            self._link(Path(src), self.models_dir / "vae" / name)
        self.whitelist = []
        if link_pack:
            self._link(REPO_ROOT, self.custom_nodes_dir / PACK_FOLDER_NAME)
            self.whitelist.append(PACK_FOLDER_NAME)
        if link_test_nodes:
            self._link(TEST_NODES_DIR, self.custom_nodes_dir / TEST_PACK_FOLDER_NAME)
            self.whitelist.append(TEST_PACK_FOLDER_NAME)

    @staticmethod
    def _link(src: Path, dst: Path) -> None:
        if dst.is_symlink() or dst.exists():
            if dst.is_symlink() and Path(os.readlink(dst)) == src:
                return
            dst.unlink()
        dst.symlink_to(src, target_is_directory=src.is_dir())

    def add_model(self, folder: str, src: os.PathLike, name: Optional[str] = None) -> str:
        """Link a file into models/<folder>/ (works while running: ComfyUI re-lists a folder when its mtime changes)."""
        src = Path(src).resolve()
        name = name or src.name
        (self.models_dir / folder).mkdir(parents=True, exist_ok=True)
        self._link(src, self.models_dir / folder / name)
        return name

    # -- lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list:
        cmd = [self.python, str(self.comfyui_path / "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--base-directory", str(self.base_dir),
               "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}",
               "--disable-auto-launch", "--disable-api-nodes", "--disable-all-custom-nodes"]
        if self.whitelist:
            cmd += ["--whitelist-custom-nodes", *self.whitelist]
        return cmd + list(self.extra_args)

    def start(self, timeout: float = 240.0) -> "ComfyServer":
        last_error = None
        for _attempt in range(3):
            if self.port is None or _attempt:
                self.port = free_port()
            env = dict(os.environ if self.env is None else self.env)
            env.setdefault("PYTHONUNBUFFERED", "1")
            self._log_file = open(self.log_path, "ab")
            self._log_file.write(f"\n$ {' '.join(self.command())}\n".encode())
            self._log_file.flush()
            self.proc = subprocess.Popen(self.command(), cwd=str(self.comfyui_path), stdout=self._log_file,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            try:
                self._wait_ready(timeout)
                return self
            except ComfyError as e:
                last_error = e
                port_clash = "address already in use" in self.log_tail(4000).lower()
                self.stop()
                if not port_clash:
                    break
        raise last_error

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with code {self.proc.returncode} during start-up\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                return
            except (OSError, urllib.error.URLError, ValueError):
                time.sleep(0.25)
        raise ComfyError(f"ComfyUI did not answer /system_stats within {timeout:.0f}s\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    # -- HTTP
    def _request(self, method: str, path: str, body: Any = None, timeout: float = 30.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        return urllib.request.urlopen(req, timeout=timeout)

    def get_json(self, path: str, timeout: float = 30.0):
        with self._request("GET", path, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def post_json(self, path: str, body: Any = None, timeout: float = 30.0):
        with self._request("POST", path, body if body is not None else {}, timeout=timeout) as r:
            raw = r.read()
            return json.loads(raw) if raw else None

    def object_info(self, node_class: Optional[str] = None) -> dict:
        return self.get_json("/object_info" + (f"/{urllib.parse.quote(node_class)}" if node_class else ""))

    def queue_prompt(self, prompt: dict, client_id: Optional[str] = None, prompt_id: Optional[str] = None,
                     extra_data: Optional[dict] = None) -> str:
        body = {"prompt": prompt, "client_id": client_id or f"harness-{uuid.uuid4().hex}"}
        if prompt_id:
            body["prompt_id"] = prompt_id
        if extra_data:
            body["extra_data"] = extra_data
        try:
            return self.post_json("/prompt", body)["prompt_id"]
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                raise ComfyError(f"POST /prompt failed with HTTP {e.code}: {raw[:2000]!r}") from None
            raise PromptRejected(parsed) from None

    def history(self, prompt_id: Optional[str] = None) -> dict:
        return self.get_json("/history" + (f"/{prompt_id}" if prompt_id else ""))

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.2) -> dict:
        """Poll /history/<id> until the prompt finished; return its history entry or raise PromptFailed/Interrupted."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id).get(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "success":
                    return entry
                for kind, info in status.get("messages", []):
                    if kind == "execution_interrupted":
                        raise PromptInterrupted(info)
                    if kind == "execution_error":
                        raise PromptFailed(info, self.log_tail(3000))
                raise ComfyError(f"prompt {prompt_id} ended with status {status}")
            if self.proc is not None and self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited (code {self.proc.returncode}) while running {prompt_id}\n"
                                 f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f}s; "
                                   f"queue={self.get_json('/queue')}\n{self.log_tail(3000)}")
            time.sleep(poll)

    def run_prompt(self, prompt: dict, timeout: float = 300.0, client_id: Optional[str] = None, **kw) -> dict:
        """Queue an API-format prompt and wait for it: returns the history entry (keys prompt, outputs, status, meta)."""
        return self.wait(self.queue_prompt(prompt, client_id=client_id, **kw), timeout=timeout)

    def interrupt(self, prompt_id: Optional[str] = None) -> None:
        """POST /interrupt (the UI's Cancel): the running prompt stops at its next interrupt check."""
        self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def clear_queue(self) -> None:
        self.post_json("/queue", {"clear": True})

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self.post_json("/free", {"unload_models": unload_models, "free_memory": free_memory})

    def output_files(self, entry: dict, kind: str = "images") -> list:
        """Paths of the files a history entry's outputs list (e.g. SaveImage images) under output/ or temp/."""
        paths = []
        for out in entry.get("outputs", {}).values():
            for item in out.get(kind, []) or []:
                root = {"output": self.output_dir, "temp": self.base_dir / "temp", "input": self.input_dir}
                paths.append(root.get(item.get("type", "output"), self.output_dir) / item.get("subfolder", "")
                             / item["filename"])
        return paths

    def ws_client(self, client_id: Optional[str] = None, timeout: float = 10.0) -> "WSClient":
        return WSClient("127.0.0.1", self.port, client_id or f"harness-{uuid.uuid4().hex}", timeout=timeout)


# ------------------------------------------------------------------------------------------------ websocket

class WSClient:
    """Minimal stdlib websocket client for ComfyUI's /ws: collects every message in a background thread.

    ``messages`` holds ``{"type": ..., "data": ...}`` dicts (JSON frames) and ``{"type": "binary", "data": bytes}``
    (preview frames). Pass ``client_id`` to ``ComfyServer.run_prompt`` so targeted events reach this socket.
    """

    def __init__(self, host: str, port: int, client_id: str, timeout: float = 10.0):
        self.client_id = client_id
        self.messages: list = []
        self._cond = threading.Condition()
        self._closed = False
        self._sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        req = (f"GET /ws?clientId={urllib.parse.quote(client_id)} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               f"Sec-WebSocket-Version: 13\r\n\r\n")
        self._sock.sendall(req.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self._sock.recv(4096)
            if not chunk:
                raise ComfyError("websocket handshake: connection closed")
            head += chunk
        head, self._buf = head.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ComfyError(f"websocket handshake failed: {head[:200]!r}")
        self._sock.settimeout(None)
        self._send_lock = threading.Lock()
        self._thread = threading.Thread(target=self._reader, daemon=True)
        self._thread.start()

    def _recv_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x80 | opcode])
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        with self._send_lock:
            self._sock.sendall(header + mask + masked)

    def _reader(self) -> None:
        fragments, frag_op = [], None
        try:
            while True:
                b1, b2 = self._recv_exact(2)
                fin, opcode = b1 & 0x80, b1 & 0x0F
                n = b2 & 0x7F
                if n == 126:
                    n = struct.unpack(">H", self._recv_exact(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", self._recv_exact(8))[0]
                mask = self._recv_exact(4) if b2 & 0x80 else None
                payload = self._recv_exact(n)
                if mask:
                    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                if opcode == 0x9:
                    self._send_frame(0xA, payload)
                    continue
                if opcode == 0xA:
                    continue
                if opcode == 0x8:
                    break
                if opcode in (0x1, 0x2):
                    fragments, frag_op = [payload], opcode
                elif opcode == 0x0:
                    fragments.append(payload)
                if not fin:
                    continue
                data = b"".join(fragments)
                if frag_op == 0x1:
                    try:
                        msg = json.loads(data.decode("utf-8"))
                    except ValueError:
                        msg = {"type": "text", "data": data.decode("utf-8", "replace")}
                else:
                    msg = {"type": "binary", "data": data}
                with self._cond:
                    self.messages.append(msg)
                    self._cond.notify_all()
        except (OSError, ConnectionError, ValueError):
            pass
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 60.0) -> dict:
        """Block until a message satisfying ``predicate`` has arrived (also looks at earlier messages)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                for msg in self.messages[seen:]:
                    if predicate(msg):
                        return msg
                seen = len(self.messages)
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    types = [m.get("type") for m in self.messages][-30:]
                    raise TimeoutError(f"no matching websocket message within {timeout:.0f}s; last types: {types}")
                self._cond.wait(left)

    def wait_done(self, prompt_id: str, timeout: float = 300.0) -> list:
        """Wait for ``executing {node: None, prompt_id}`` (ComfyUI's end-of-prompt marker); return its messages."""
        self.wait_for(lambda m: m.get("type") == "executing" and isinstance(m.get("data"), dict)
                      and m["data"].get("node") is None and m["data"].get("prompt_id") == prompt_id, timeout)
        return self.messages_for(prompt_id)

    def messages_for(self, prompt_id: str, type_prefix: Optional[str] = None) -> list:
        """JSON messages whose data carries this prompt_id (custom events should include it, or use of_type)."""
        with self._cond:
            msgs = list(self.messages)
        return [m for m in msgs if isinstance(m.get("data"), dict) and m["data"].get("prompt_id") == prompt_id
                and (type_prefix is None or str(m.get("type", "")).startswith(type_prefix))]

    def of_type(self, type_or_prefix: str) -> list:
        with self._cond:
            return [m for m in self.messages if str(m.get("type", "")).startswith(type_or_prefix)]

    def close(self) -> None:
        try:
            self._send_frame(0x8, struct.pack(">H", 1000))
        except OSError:
            pass
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------------ prompts

def txt2img_prompt(ckpt_name: str, *, text: str = "a tiny test image", steps: int = 2, width: int = 64,
                   height: int = 64, seed: int = 0, prefix: str = "loralab_smoke") -> dict:
    """API-format CheckpointLoaderSimple -> CLIPTextEncode -> EmptyLatentImage -> KSampler -> VAEDecode -> SaveImage."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0],
            "seed": seed, "steps": steps, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": prefix}},
    }


def build_checkpoints_subprocess(cache_dir: os.PathLike, comfyui_path: os.PathLike, kinds=None,
                                 python: str = sys.executable, timeout: float = 900.0) -> dict:
    """Run tiny_checkpoints.ensure_checkpoints in a child process (keeps ComfyUI/torch out of this process)."""
    script = Path(__file__).resolve().parent / "tiny_checkpoints.py"
    cmd = [python, str(script), "--comfyui", str(comfyui_path), "--cache-dir", str(cache_dir)]
    if kinds:
        cmd += ["--kinds", *kinds]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise ComfyError(f"building tiny checkpoints failed ({res.returncode}):\n{res.stdout[-3000:]}\n"
                         f"{res.stderr[-3000:]}")
    last = [line for line in res.stdout.splitlines() if line.startswith("{")][-1]
    return {k: Path(v) for k, v in json.loads(last).items()}


def rmtree_quiet(path: os.PathLike) -> None:
    shutil.rmtree(path, ignore_errors=True)
