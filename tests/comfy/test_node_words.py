"""Inside ComfyUI, advice and pages use the node's own words: every widget the advice names exists on its node, the
example workflows title the nodes as the advice does, and the page matches a run to its node by the same run-folder
name the pack writes (web/loralab_core.js sanitizeRunName = nodes/paths.py sanitize_name)."""
from __future__ import annotations

import importlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfy
ROOT = Path(__file__).resolve().parents[2]
NAMES = ["my_lora", "my lora!/v2", "  .hidden. ", "???", "", "ünïcode name", "a" * 200, "run\\name..", "x.y-z_1 2",
         "emoji 🐕 dog"]


def test_every_widget_the_advice_names_is_on_its_node(loralab_pack):
    names = importlib.import_module("loralab_pack.nodes.widget_names")
    nodes = importlib.import_module("loralab_pack.nodes")
    inputs = {cls.define_schema().node_id: {i.id for i in cls.define_schema().inputs} for cls in nodes.NODES}
    missing = [(key, node_id, widget) for key, ((node_id, _), widget) in names.WIDGETS.items()
               if widget not in inputs.get(node_id, set())]
    assert missing == []
    # the titles the advice uses are the ones the shipped workflows give the nodes
    titles = {n["type"]: n["title"] for n in json.loads((ROOT / "example_workflows" /
                                                        "train_then_generate_sd15.json").read_text())["nodes"]}
    for node_id, title in {node for node, _ in names.WIDGETS.values()}:
        assert titles[node_id] == title
    naming = names.comfy_naming()
    assert naming("optimizer.warmup_steps") == "Configure LoRA's warmup_steps"
    assert naming("buckets.resolutions") == "Bucket & Cache Latents' resolution"
    assert naming("keep_last") == "keep_last"  # no widget: the config name


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_page_names_run_folders_as_the_pack_does(loralab_pack):
    paths = importlib.import_module("loralab_pack.nodes.paths")
    script = ("import('./web/loralab_core.js').then((m) => { const names = JSON.parse(process.argv[1]); "
              "console.log(JSON.stringify(names.map((n) => m.sanitizeRunName(n)))); })")
    r = subprocess.run(["node", "-e", script, json.dumps(NAMES)], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [paths.sanitize_name(n) for n in NAMES]


def test_engine_errors_reach_the_node_in_its_words(loralab_pack):
    train_node = importlib.import_module("loralab_pack.nodes.train_node")
    names = importlib.import_module("loralab_pack.nodes.widget_names")
    errors = importlib.import_module("loralab_pack.trainer.errors")
    error = errors.ConfigError("optimizer.name = 'adamw8bit': AdamW8bit needs the bitsandbytes package; or lower "
                               "network.rank")
    error.problems = ["kept"]
    shown = train_node.in_node_words(error, names.comfy_naming())
    assert type(shown) is errors.ConfigError and shown.problems == ["kept"]
    assert str(shown) == ("Configure LoRA's optimizer = 'adamw8bit': AdamW8bit needs the bitsandbytes package; or "
                          "lower Configure LoRA's rank")
    plain = errors.TrainingError("no cached latents to train on")
    assert train_node.in_node_words(plain, names.comfy_naming()) is plain
