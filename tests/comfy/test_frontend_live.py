"""What the user sees in the REAL ComfyUI page (Debian's Chromium via playwright-core, ComfyUI's own frontend).

* tests/comfy/frontend_live.mjs: the shipped UI example, shrunk to the tiny checkpoint, queued from the page. Load
  Dataset, Bucket & Cache Latents and Configure LoRA show their report on the node; while Train LoRA trains its
  panel shows step, it/s, ETA, loss and memory, uncut at the template's node width and at ComfyUI's minimum node
  width; a second page (another browser profile, as on another device) opened mid-run follows the run live, and
  catches up on the curve from the history route, while a node of another run stays idle; a page reload mid-run
  brings the whole curve (equal to the run's history on disk) and the reports back; Stop shows "stopped".
* tests/comfy/templates_page.mjs: the template browser lists the examples under "LoRA Lab" with thumbnails that
  load, and each template opens framed (every node with its title inside the window).

Needs (skipped with the reason when missing): a ComfyUI checkout (COMFYUI_PATH, see SETUP.md), `node`, `chromium`
(apt-get install -y chromium, or LORALAB_CHROMIUM) and `playwright-core` (`npm ci` in the repository root).
Screenshots in test-artifacts/: frontend_live_running.png, frontend_live_reloaded.png, frontend_live_stopped.png,
frontend_live_second_page.png, panel_template_width.png, panel_min_width.png, node_load_dataset.png,
node_cache_latents.png, node_configure_lora.png, templates_dialog.png, template_opened_<name>.png.

LORALAB_WRITE_THUMBNAILS=1 re-renders example_workflows/<name>.jpg: each template as it opens in the real page,
drawn at full detail in a large window, cut to its nodes and scaled to THUMBNAIL_WIDTH with Pillow.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import uuid
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shapes import write_shape_dataset  # noqa: E402

try:
    from .harness import PACK_FOLDER_NAME
except ImportError:
    from harness import PACK_FOLDER_NAME  # type: ignore[no-redef]

pytestmark = [pytest.mark.comfy, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "frontend_live.mjs"
TEMPLATES_SCRIPT = Path(__file__).resolve().parent / "templates_page.mjs"
EXAMPLES = ROOT / "example_workflows"
THUMBNAIL_WIDTH = 512  # the template card shows 256 px (object-contain); twice that for high-DPI screens
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


SCREENSHOTS = ("frontend_live_running.png", "frontend_live_reloaded.png", "frontend_live_stopped.png",
               "frontend_live_second_page.png", "panel_template_width.png", "panel_min_width.png",
               "node_load_dataset.png", "node_cache_latents.png", "node_configure_lora.png")


def _summary(out: str) -> dict:
    return json.loads(next(line for line in out.splitlines() if line.startswith("SUMMARY "))[8:])


def _node(script: Path, env: dict, timeout: float, log_name: str):
    r = subprocess.run([NODE, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    out = r.stdout + r.stderr
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / log_name).write_text(out)
    if r.returncode == 77:
        pytest.skip(out.strip().splitlines()[-1] if out.strip() else "requirement missing")
    return r, out


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
    for name in SCREENSHOTS:
        (ARTIFACTS / name).unlink(missing_ok=True)
    try:
        r, out = _node(SCRIPT, env, 480, "frontend_live.log")
    finally:
        _idle(comfy_server)
    assert r.returncode == 0, out[-8000:] + "\n--- server log tail ---\n" + comfy_server.log_tail(3000)

    summary = _summary(out)
    before, after = summary["before"], summary["after"]
    assert before["laterStep"] >= before["firstStep"] + 3
    assert after["comparedWithDisk"] == before["laterStep"] and after["step"] >= before["laterStep"]
    assert summary["persistedBeforeReload"]["runProp"] == before["run"] == after["runProp"]
    assert summary["stopped"]["step"].startswith("step ")
    run_dirs = sorted((comfy_server.output_dir / "loralab" / "runs").glob(f"{run_name}-*"))
    assert [d.name for d in run_dirs] == [before["run"]]
    assert not (run_dirs[0] / "final.safetensors").exists()  # stopped mid-run, as the panel said
    # each data node shows its own report on the node, and it is still there after the reload
    reports = summary["reports"]
    assert reports["2"]["value"].startswith(f"Dataset: {dataset}") and "4 usable image(s)" in reports["2"]["value"]
    assert "bucket" in reports["3"]["value"].lower()
    assert reports["4"]["value"].startswith("network: LoRA rank 4") and "Memory estimate (" in reports["4"]["value"]
    assert reports["4"]["table"] == "true"  # the estimate's breakdown is a table: monospace, not wrapped
    for node_id in ("2", "3", "4"):
        assert reports[node_id]["visible"] and reports[node_id]["afterReload"] == reports[node_id]["value"], node_id
    # the status line keeps step, it/s, ETA and memory whole at the template's width and at the minimum width
    status = summary["status"]
    assert status["template"]["width"] == summary["templateTrainWidth"]
    assert status["minimum"]["width"] < status["template"]["width"]
    for at in ("template", "minimum"):
        assert status[at]["cut"] == [] and re.fullmatch(r"\d+(\.\d+)? (it/s|s/it)", status[at]["rate"]), status[at]
        assert re.fullmatch(r"ETA (≥ )?\d.*", status[at]["eta"]) and status[at]["memText"], status[at]
    # a second page (another profile) follows the run: live, from the history route, only on the matching node
    second = summary["secondPage"]
    assert second["otherRunStayedIdle"] and second["phase"] == "training" and second["historyRun"] == before["run"]
    assert second["hasStepOne"] and second["historyRequests"] >= 1
    for name in SCREENSHOTS:
        assert (ARTIFACTS / name).stat().st_size > 5_000, name


def test_templates_open_framed_with_their_thumbnails(comfy_server):
    _browser_or_skip()
    env = {**os.environ, "LORALAB_CHROMIUM": CHROMIUM, "LORALAB_COMFY_URL": comfy_server.url,
           "LORALAB_ARTIFACTS": str(ARTIFACTS), "LORALAB_PACK_FOLDER": PACK_FOLDER_NAME}
    names = sorted(p.stem for p in EXAMPLES.glob("*.json"))
    env["LORALAB_TEMPLATES"] = ",".join(names)
    if os.environ.get("LORALAB_WRITE_THUMBNAILS"):
        with tempfile.TemporaryDirectory() as tmp:
            r, out = _node(TEMPLATES_SCRIPT, {**env, "LORALAB_THUMBNAIL_DIR": tmp}, 300, "templates_thumbnails.log")
            assert r.returncode == 0, out[-6000:]
            for name in names:
                _write_thumbnail(Path(tmp) / f"{name}.png", EXAMPLES / f"{name}.jpg")
    for name in names:  # every template has one: the browser shows a broken image for a missing file
        with Image.open(EXAMPLES / f"{name}.jpg") as thumb:
            assert thumb.format == "JPEG" and thumb.width == THUMBNAIL_WIDTH and thumb.height > 200, name
    r, out = _node(TEMPLATES_SCRIPT, env, 300, "templates_page.log")
    assert r.returncode == 0, out[-6000:]
    summary = _summary(out)
    assert {c["name"] for c in summary["cards"]} >= set(names)
    for name in names:
        assert summary["templates"][name]["outside"] == [] and summary["templates"][name]["nodes"] >= 10
    for name in ("templates_dialog.png", *(f"template_opened_{n}.png" for n in names)):
        assert (ARTIFACTS / name).stat().st_size > 5_000, name


def _write_thumbnail(render: Path, target: Path) -> None:
    """The real page's render of the template, scaled to THUMBNAIL_WIDTH, as a JPEG (written atomically)."""
    with Image.open(render) as image:
        image = image.convert("RGB")
        height = round(image.height * THUMBNAIL_WIDTH / image.width)
        small = image.resize((THUMBNAIL_WIDTH, height), Image.LANCZOS)
    tmp = target.with_suffix(".jpg.tmp")
    small.save(tmp, format="JPEG", quality=88, optimize=True)
    os.replace(tmp, target)
