"""The UI-format example workflows (what ComfyUI's template browser shows) are exactly the API twins the server
tests run, laid out for the canvas. Regenerate them with LORALAB_WRITE_WORKFLOWS=1."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

try:
    from .ui_workflow import api_to_ui
except ImportError:
    from ui_workflow import api_to_ui  # type: ignore[no-redef]

pytestmark = pytest.mark.comfy
ROOT = Path(__file__).resolve().parents[2] / "example_workflows"
# model-file drop-downs list what the test server has, not the files the examples name
LOADERS = {"CheckpointLoaderSimple", "UNETLoader", "DualCLIPLoader", "VAELoader"}


FAMILIES = ["sd15", "sdxl", "sd35", "flux"]


@pytest.mark.parametrize("family", FAMILIES)
def test_ui_workflow_matches_its_api_twin(comfy_server, family):
    api = json.loads((ROOT / "api" / f"train_then_generate_{family}.json").read_text())
    ui = api_to_ui(api, comfy_server.object_info())
    target = ROOT / f"train_then_generate_{family}.json"
    if os.environ.get("LORALAB_WRITE_WORKFLOWS"):
        target.write_text(json.dumps(ui, indent=1) + "\n")
    assert json.loads(target.read_text()) == ui
    assert {n["type"] for n in ui["nodes"]} >= {"LoraLab_LoadDataset", "LoraLab_CacheLatents", "LoraLab_ConfigureLoRA",
                                                "LoraLab_TrainLoRA", "LoraLab_SaveLoRA", "KSampler"}
    info = comfy_server.object_info()
    for node_id, node in api.items():  # every input the example sets exists on the server's node, as a valid value
        spec = info[node["class_type"]]["input"]
        known = {**spec.get("required", {}), **spec.get("optional", {})}
        for key, value in node["inputs"].items():
            assert key in known, f"{family} example node {node_id} ({node['class_type']}): no input {key!r}"
            options = known[key][0]
            if isinstance(options, list) and not isinstance(value, list) and node["class_type"] not in LOADERS:
                assert value in options, f"{family} example node {node_id}: {key} = {value!r} not in {options}"


def test_templates_are_listed_by_the_server(comfy_server):
    listed = comfy_server.get_json("/workflow_templates")
    names = next(v for k, v in listed.items() if "lora" in k.lower())
    assert {f"train_then_generate_{family}" for family in FAMILIES} <= set(names)
