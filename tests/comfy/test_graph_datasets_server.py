"""Graph-native datasets and checkpoint comparison through a real ComfyUI server.

Two images loaded with stock Load Image nodes and batched with stock Image Batch, captioned from a STRING list made
by another node, train and save end to end; the latent cache follows the pixels (changing one image file re-encodes
that one only); a caption count that does not match is one clear error. Train LoRA's numbered LoRAs land in
models/loras, its TensorBoard log holds every step and the previews (sampled with the tuned preview settings), and
Compare LoRAs renders the run's checkpoints into a grid with a JSON report that lists exactly the files on disk.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.comfy, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
CAPTIONS = "a red square\na green circle"


def write_image(path: Path, colour, shape: str) -> None:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), (20, 20, 20))
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)((12, 12, 52, 52), fill=colour)
    image.save(path)


def configure_inputs() -> dict:
    example = json.loads((ROOT / "example_workflows" / "api" / "train_then_generate_sd15.json").read_text())
    inputs = dict(example["4"]["inputs"])
    inputs.update(mixed_precision="no", rank=4, alpha=4.0, warmup_steps=0, gradient_checkpointing=False,
                  model=["1", 0], latents=["3", 0])
    return inputs


def graph(ckpt: str, captions: list | str, run_name: str) -> dict:
    return {
        "1": {"class_type": "LoraLabTest_TinyCheckpointLoader", "inputs": {"ckpt_name": ckpt, "te_layers": 3}},
        "20": {"class_type": "LoadImage", "inputs": {"image": "graph_a.png"}},
        "21": {"class_type": "LoadImage", "inputs": {"image": "graph_b.png"}},
        "22": {"class_type": "ImageBatch", "inputs": {"image1": ["20", 0], "image2": ["21", 0]}},
        "23": {"class_type": "LoraLabTest_StringList", "inputs": {"text": CAPTIONS}},
        "2": {"class_type": "LoraLab_DatasetFromImages", "inputs": {
            "images": ["22", 0], "captions": captions, "trigger_word": "shp", "repeats": 1,
            "shuffle_captions": False, "keep_tokens": 1, "caption_separator": ",", "caption_dropout": 0.0}},
        "3": {"class_type": "LoraLab_CacheLatents", "inputs": {
            "dataset": ["2", 0], "vae": ["1", 2], "resolution": 64, "extra_resolutions": "", "min_bucket": 64,
            "max_bucket": 128, "bucket_step": 64, "no_upscale": False, "crop": "center", "flip": False,
            "cache_folder": ""}},
        "4": {"class_type": "LoraLab_ConfigureLoRA", "inputs": configure_inputs()},
        "5": {"class_type": "LoraLab_TrainLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "latents": ["3", 0], "config": ["4", 0], "steps": 4,
            "batch_size": 1, "seed": 0, "save_every": 2, "run_name": run_name, "numbered_loras": True,
            "tensorboard": True, "vae": ["1", 2], "preview_prompts": "shp, a red square", "preview_every": 2,
            "preview_steps": 2, "preview_cfg": 5.0, "preview_sampler": "euler", "preview_scheduler": "default",
            "preview_negative": "blurry", "preview_width": 128, "preview_height": 64}},
        "6": {"class_type": "LoraLab_SaveLoRA", "inputs": {
            "lora": ["5", 2], "filename": f"loralab/{run_name}", "dtype": "fp32", "title": "", "trigger_phrase": "",
            "notes": ""}},
    }


def text(entry: dict, node: str) -> str:
    return "\n".join(entry["outputs"][node]["text"])


@pytest.fixture(scope="module")
def trained(comfy_server, tiny_checkpoints):
    """The graph run once: (history entry, run folder, numbered-LoRA folder)."""
    write_image(comfy_server.input_dir / "graph_a.png", (220, 40, 40), "square")
    write_image(comfy_server.input_dir / "graph_b.png", (40, 180, 60), "circle")
    entry = comfy_server.run_prompt(graph(tiny_checkpoints["sd15"].name, ["23", 0], "graph"), timeout=900)
    runs = sorted((comfy_server.output_dir / "loralab" / "runs").glob("graph-*"))
    assert len(runs) == 1
    return entry, runs[0], comfy_server.models_dir / "loras" / "loralab" / runs[0].name


def test_images_and_captions_from_other_nodes_train_and_save(comfy_server, trained):
    entry, run, numbered = trained
    report = text(entry, "2")
    assert "Dataset: images from the graph" in report and "2 usable image(s), 2 with a caption" in report
    assert "Cache: 0 hit(s), 2 encoded" in text(entry, "3")
    assert "trained: 4 steps" in text(entry, "5")
    assert (run / "final.safetensors").is_file()
    assert (comfy_server.models_dir / "loras" / "loralab" / "graph.safetensors").is_file()
    assert sorted(p.name for p in numbered.glob("*.safetensors")) == ["graph-000002.safetensors",
                                                                       "graph-000004.safetensors"]
    from safetensors import safe_open

    with safe_open(str(run / "final.safetensors"), framework="pt") as f:
        assert f.metadata()["modelspec.trigger_phrase"] == "shp"


def test_train_lora_logs_to_tensorboard_with_its_tuned_previews(trained):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (CI installs it)")
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run, _ = trained
    previews = sorted((run / "previews").glob("*.png"))
    assert [p.name for p in previews] == ["step_000002.png", "step_000004.png"]
    with Image.open(previews[0]) as grid:  # base and LoRA columns of 128 x 64 (preview_width / preview_height)
        assert grid.size[1] == 20 + 64 and grid.size[0] > 2 * 128
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Images("preview")] == [2, 4]


def test_changing_one_image_re_encodes_only_that_one(comfy_server, tiny_checkpoints, trained):
    write_image(comfy_server.input_dir / "graph_b.png", (40, 80, 220), "circle")  # the pixels of one image change
    entry = comfy_server.run_prompt(graph(tiny_checkpoints["sd15"].name, ["23", 0], "graph_changed"), timeout=900)
    assert "Cache: 1 hit(s), 1 encoded" in text(entry, "3")
    write_image(comfy_server.input_dir / "graph_b.png", (40, 180, 60), "circle")  # back as it was


def test_caption_count_mismatch_is_a_clear_error(comfy_server, tiny_checkpoints, trained):
    prompt = graph(tiny_checkpoints["sd15"].name, ["24", 0], "graph_mismatch")
    # one text with one caption per line, made by a stock node: three captions for two images
    prompt["24"] = {"class_type": "StringConcatenate", "inputs": {"string_a": CAPTIONS, "string_b": "a third",
                                                                  "delimiter": "\n"}}
    with pytest.raises(Exception, match=r"2 image\(s\) but 3 caption\(s\)"):
        comfy_server.run_prompt(prompt, timeout=600)


def test_compare_loras_in_the_training_graph_takes_the_run_folder_from_train_lora(comfy_server, tiny_checkpoints,
                                                                                  trained):
    _, run, numbered = trained
    prompt = graph(tiny_checkpoints["sd15"].name, ["23", 0], "graph")  # the trained graph: Train LoRA is cached
    prompt["30"] = {"class_type": "LoraLab_CompareLoRAs", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "loras": "", "run_folder": ["5", 5], "strengths": "1.0",
        "include_base": False, "prompts": "shp", "negative": "", "seeds": "0", "steps": 1, "cfg": 7.0,
        "sampler_name": "euler", "scheduler": "normal", "width": 64, "height": 64,
        "filename_prefix": "loralab/in_graph"}}
    entry = comfy_server.run_prompt(prompt, timeout=900)
    (grid_file,) = comfy_server.output_files(entry)
    report = json.loads(grid_file.with_suffix(".json").read_text())
    assert report["loras"] == sorted(str(p.resolve()) for p in numbered.glob("*.safetensors"))
    assert not list(run.glob("state/step_000006"))  # nothing trained again


def test_compare_loras_renders_the_runs_numbered_loras(comfy_server, tiny_checkpoints, trained):
    from PIL import Image

    _, run, numbered = trained
    prompt = {
        "1": {"class_type": "LoraLabTest_TinyCheckpointLoader",
              "inputs": {"ckpt_name": tiny_checkpoints["sd15"].name, "te_layers": 3}},
        "30": {"class_type": "LoraLab_CompareLoRAs", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "loras": "", "run_folder": run.name,
            "strengths": "1.0", "include_base": True, "prompts": "shp, a red square", "negative": "",
            "seeds": "0, 1", "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "width": 64,
            "height": 64, "filename_prefix": "loralab/compare"}},
    }
    entry = comfy_server.run_prompt(prompt, timeout=900)
    (grid_file,) = comfy_server.output_files(entry)
    report = json.loads(grid_file.with_suffix(".json").read_text())
    on_disk = sorted(str(p.resolve()) for p in numbered.glob("*.safetensors"))
    assert report["loras"] == on_disk and len(on_disk) == 2
    assert [c["label"] for c in report["columns"]] == ["base", "step 2", "step 4"]
    assert [c["step"] for c in report["columns"]] == [None, 2, 4]
    assert report["rows"] == [{"prompt": "shp, a red square", "seed": 0}, {"prompt": "shp, a red square", "seed": 1}]
    assert len(report["cells"]) == 6
    for cell in report["cells"]:
        assert {"file", "step", "seed", "prompt", "image", "strength"} <= set(cell)
        image = grid_file.parent / cell["image"]
        assert image.is_file() and Image.open(image).size == (64, 64)
    with Image.open(grid_file) as grid:
        assert grid.size[1] == 20 + 2 * 64 and grid.size[0] > 3 * 64
    cells = {(c["row"], c["column"]): c for c in report["cells"]}
    assert cells[(0, 0)]["file"] is None and cells[(1, 2)]["file"].endswith("graph-000004.safetensors")
    base = Image.open(grid_file.parent / cells[(0, 0)]["image"]).tobytes()
    assert base != Image.open(grid_file.parent / cells[(0, 2)]["image"]).tobytes()  # the LoRA changes the image
