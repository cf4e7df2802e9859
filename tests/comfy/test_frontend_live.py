"""The live panel in the REAL ComfyUI page: the shipped UI example, shrunk to the tiny checkpoint, queued from the
page; while Train LoRA trains its panel shows step, loss and memory and they move; a page reload mid-run brings the
whole curve back (every step up to the one seen before the reload, equal to the run's history on disk); Stop
(POST /interrupt) shows "stopped". Driven by tests/comfy/frontend_live.mjs in Debian's Chromium via playwright-core.

Needs (skipped with the reason when missing): a ComfyUI checkout (COMFYUI_PATH, see SETUP.md), `node`, `chromium`
(apt-get install -y chromium, or LORALAB_CHROMIUM) and `playwright-core` (`npm ci` in the repository root).
Screenshots: test-artifacts/frontend_live_running.png, frontend_live_reloaded.png, frontend_live_stopped.png.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shapes import write_shape_dataset  # noqa: E402

pytestmark = [pytest.mark.comfy, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "frontend_live.mjs"
ARTIFACTS = ROOT / "test-artifacts"
NODE = shutil.which("node")
CHROMIUM = os.environ.get("LORALAB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def _browser_or_skip() -> None:
    """Same detection as tests/test_web_browser.py."""
    if NODE is None:
        pytest.skip("node is not installed (needed to drive Chromium through playwright-core)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install -y chromium, or set LORALAB_CHROMIUM)")
    r = subprocess.run([NODE, "-e", "import('playwright-core').then(() => process.exit(0), () => process.exit(1))"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.skip("playwright-core is not installed (run `npm ci` in the repository root)")


def _idle(server, timeout: float = 120.0) -> None:
    """Leave the shared server idle for the next test: stop whatever still runs and wait for an empty queue."""
    deadline = time.monotonic() + timeout
    interrupted = False
    while time.monotonic() < deadline:
        queue = server.get_json("/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            return
        if not interrupted:
            server.clear_queue()
            server.interrupt()
            interrupted = True
        time.sleep(0.5)
    raise TimeoutError(f"ComfyUI still busy after the test: {server.get_json('/queue')}")


def test_live_panel_in_the_real_comfyui_page(comfy_server, tiny_checkpoints):
    _browser_or_skip()
    # Our routes are served by the real server (they used to be registered only in ComfyExtension.on_load, which
    # ComfyUI 0.3.x never calls: the reloaded page then got aiohttp's bare 404 and never redrew the curve).
    with pytest.raises(urllib.error.HTTPError) as missing:
        comfy_server.get_json("/api/loralab/runs/no-such-run/history")
    assert missing.value.code == 404 and json.loads(missing.value.read()) == {"error": "no run 'no-such-run'"}

    dataset = write_shape_dataset(comfy_server.input_dir / "frontend_live_shapes", 4,
                                  size=[(64, 64), (96, 64), (64, 96), (64, 64)])
    run_name = f"frontend_live_{uuid.uuid4().hex[:6]}"  # a fresh run folder: never a finished run to reuse
    env = {**os.environ, "LORALAB_CHROMIUM": CHROMIUM, "LORALAB_COMFY_URL": comfy_server.url,
           "LORALAB_DATASET": str(dataset), "LORALAB_CKPT": tiny_checkpoints["sd15"].name,
           "LORALAB_RUN_NAME": run_name, "LORALAB_ARTIFACTS": str(ARTIFACTS)}
    for name in ("frontend_live_running.png", "frontend_live_reloaded.png", "frontend_live_stopped.png"):
        (ARTIFACTS / name).unlink(missing_ok=True)
    try:
        r = subprocess.run([NODE, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=420, env=env)
    finally:
        _idle(comfy_server)
    out = r.stdout + r.stderr
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "frontend_live.log").write_text(out)
    if r.returncode == 77:
        pytest.skip(out.strip().splitlines()[-1] if out.strip() else "requirement missing")
    assert r.returncode == 0, out[-8000:] + "\n--- server log tail ---\n" + comfy_server.log_tail(3000)

    summary = json.loads(next(line for line in out.splitlines() if line.startswith("SUMMARY "))[8:])
    before, after = summary["before"], summary["after"]
    assert before["laterStep"] >= before["firstStep"] + 3
    assert after["comparedWithDisk"] == before["laterStep"] and after["step"] >= before["laterStep"]
    assert summary["persistedBeforeReload"]["runProp"] == before["run"] == after["runProp"]
    assert summary["stopped"]["step"].startswith("step ")
    run_dirs = sorted((comfy_server.output_dir / "loralab" / "runs").glob(f"{run_name}-*"))
    assert [d.name for d in run_dirs] == [before["run"]]
    assert not (run_dirs[0] / "final.safetensors").exists()  # stopped mid-run, as the panel said
    for name in ("frontend_live_running.png", "frontend_live_reloaded.png", "frontend_live_stopped.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000
