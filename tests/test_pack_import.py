"""Invariant 5: importing the pack at ComfyUI start-up loads nothing heavy (no torch, no engine modules)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, json, sys, time
start = time.perf_counter()
spec = importlib.util.spec_from_file_location("loralab_probe", sys.argv[1] + "/__init__.py",
                                              submodule_search_locations=[sys.argv[1]])
module = importlib.util.module_from_spec(spec)
sys.modules["loralab_probe"] = module
spec.loader.exec_module(module)
print(json.dumps({"seconds": time.perf_counter() - start, "modules": sorted(sys.modules),
                  "web": module.WEB_DIRECTORY, "entry": callable(module.comfy_entrypoint)}))
"""


def test_importing_the_pack_loads_nothing_heavy():
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    heavy = [m for m in result["modules"] if m.split(".")[0] in {"torch", "diffusers", "transformers", "safetensors",
                                                                  "numpy", "PIL", "peft"}
             or m.startswith("loralab_probe.")]
    assert heavy == []
    assert result["web"] == "./web" and result["entry"]
    print(f"pack import: {result['seconds'] * 1000:.1f} ms")
