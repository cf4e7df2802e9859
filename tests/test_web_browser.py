"""The web extension: its pure logic under node's test runner, and the live panel in headless Chromium.

Needs (skipped with the reason when missing): `node` (>= 18) for both; for the browser test also Debian's
`chromium` (apt-get install -y chromium; or LORALAB_CHROMIUM=/path/to/chrome) and `playwright-core` from npm
(`npm install` in the repository root; no browser download). Screenshots land in test-artifacts/.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NODE = shutil.which("node")
CHROMIUM = os.environ.get("LORALAB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def _run(args, timeout):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(NODE is None, reason="node is not installed (needed for the JS unit tests)")
def test_js_logic_with_node_test_runner():
    r = _run([NODE, "--test", "tests/web/"], timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "# fail 0" in out


def _playwright_available() -> bool:
    r = _run([NODE, "-e", "import('playwright-core').then(() => process.exit(0), () => process.exit(1))"], 60)
    return r.returncode == 0


@pytest.mark.slow
def test_live_panel_in_headless_chromium():
    if NODE is None:
        pytest.skip("node is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install -y chromium, or set LORALAB_CHROMIUM)")
    if not _playwright_available():
        pytest.skip("playwright-core is not installed (run `npm install` in the repository root)")
    env_chromium = {"LORALAB_CHROMIUM": CHROMIUM}
    r = subprocess.run([NODE, "tests/web/browser_check.mjs"], cwd=ROOT, capture_output=True, text=True,
                       timeout=420, env={**os.environ, **env_chromium})
    out = r.stdout + r.stderr
    if r.returncode == 77:
        pytest.skip(out.strip().splitlines()[-1] if out.strip() else "requirement missing")
    assert r.returncode == 0, out[-8000:]
    assert (ROOT / "test-artifacts" / "web_panel.png").exists()
