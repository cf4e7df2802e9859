"""One name everywhere: the Registry id ([project] name) is the folder the pack is cloned and installed into, the
folder ComfyUI names the template category after, the key of that category's title, and the repository URL the
README's install steps clone."""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_registry_id_folder_template_category_and_clone_url_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pack_id = project["project"]["name"]
    repository = project["project"]["urls"]["Repository"]
    assert pack_id == "comfyui-lora-lab" and project["tool"]["comfy"]["PublisherId"] == "loralab"
    assert repository.rstrip("/").split("/")[-1] == pack_id  # `git clone <url>` makes a folder named the id
    categories = json.loads((ROOT / "locales" / "en" / "main.json").read_text())["templateWorkflows"]["category"]
    assert categories == {pack_id: "LoRA Lab"}
    harness = (ROOT / "tests" / "comfy" / "harness.py").read_text()
    assert f'PACK_FOLDER_NAME = "{pack_id}"' in harness  # the real-page tests install it under that name
    readme = (ROOT / "README.md").read_text()
    clones = re.findall(r"git clone (\S+)", readme)
    assert clones and set(clones) == {repository}, clones
    assert f"Registry id `{pack_id}`" in readme and "<this repository>" not in readme


def test_every_example_workflow_has_a_thumbnail():
    examples = sorted((ROOT / "example_workflows").glob("*.json"))
    assert examples
    for workflow in examples:
        thumbnail = workflow.with_suffix(".jpg")  # what the template browser requests for the card
        assert thumbnail.is_file() and thumbnail.read_bytes()[:3] == b"\xff\xd8\xff", thumbnail.name
        assert "ds" not in json.loads(workflow.read_text()).get("extra", {})  # no saved view: it opens fitted
