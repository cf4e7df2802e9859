"""Compare LoRAs: one labelled grid of the base model and LoRA files at fixed seeds, with a JSON report beside it.

Rows are prompts (x seeds), columns the base model and each LoRA at each strength. The LoRAs are applied the way
ComfyUI's LoraLoader applies them (``comfy.sd.load_lora_for_models`` on the MODEL and CLIP) and every image is
sampled as KSampler would (``preview_node.sample_one``), so a cell is what the same seed gives in a normal graph.
Files go to ComfyUI's output folder with its counter: ``<prefix>_NNNNN_.png`` (the grid), ``<prefix>_NNNNN_.json``
(the report: every cell's LoRA file, step, strength, seed, prompt and image file) and ``<prefix>_NNNNN_/`` (the cells).
"""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from comfy_api.latest import io, ui

from .types import CATEGORY

MAX_LORAS = 16
NODE = "Compare LoRAs"


@dataclass(frozen=True)
class Column:
    label: str
    file: Optional[Path]  # None: the base model
    name: str  # as LoraLoader lists it (or the file name)
    step: Optional[int]
    strength: float


def lora_files(lines: str, run_folder: str) -> list[tuple[str, Path]]:
    """(name, path) of every LoRA asked for: the lines of ``lines`` (names as LoraLoader lists them, or paths),
    then the numbered LoRAs of ``run_folder`` by step. Each file once; a missing one is an error naming it."""
    import folder_paths

    from ..trainer.errors import TrainingError
    from ..trainer.files.numbered import existing_numbered
    from .paths import loras_root, resolve_run_folder

    found: list[tuple[str, Path]] = []
    missing = []
    for line in (lines or "").splitlines():
        name = line.strip().strip('"')
        if not name:
            continue
        full = folder_paths.get_full_path("loras", name)
        path = Path(full) if full else Path(name).expanduser()
        if not path.is_file():
            missing.append(name)
            continue
        found.append((name, path.resolve()))
    if missing:
        raise TrainingError(f"{NODE}: LoRA file(s) not found: {', '.join(missing)}; write one name per line as "
                            f"LoraLoader lists it (relative to {loras_root()}), or a full path")
    if run_folder.strip():
        folder = resolve_run_folder(run_folder)
        if not folder.is_dir():
            raise TrainingError(f"{NODE}: run_folder '{run_folder}' is not a run folder (looked for {folder})")
        numbered = existing_numbered(folder)
        if not numbered:
            raise TrainingError(f"{NODE}: run folder {folder} has no numbered LoRAs on disk; train with Train "
                                "LoRA's numbered_loras on (they are written every save_every steps)")
        root = loras_root()
        found += [(p.relative_to(root).as_posix() if root in p.parents else p.name, p.resolve()) for _, p in numbered]
    unique = list({path: (name, path) for name, path in found}.values())
    if not unique:
        raise TrainingError(f"{NODE}: no LoRA to compare; list LoRA files in 'loras' or give a 'run_folder'")
    if len(unique) > MAX_LORAS:
        raise TrainingError(f"{NODE}: {len(unique)} LoRAs asked for; at most {MAX_LORAS} fit one grid")
    return unique


def lora_step(path: Path) -> Optional[int]:
    """The training step of a LoRA file: its ``ss_steps`` metadata, else the number in a numbered file's name."""
    from safetensors import safe_open

    from ..trainer.files.numbered import step_of

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            steps = (f.metadata() or {}).get("ss_steps")
        if steps is not None:
            return int(steps)
    except Exception:  # noqa: BLE001 - a file without readable metadata still has a name
        pass
    return step_of(path)


def plan_columns(files: list[tuple[str, Path]], strengths: list[float], include_base: bool) -> list[Column]:
    columns = [Column("base", None, "", None, 0.0)] if include_base else []
    for name, path in files:
        step = lora_step(path)
        title = f"step {step}" if step is not None else Path(name).stem
        for strength in strengths:
            label = title if len(strengths) == 1 and strength == 1.0 else f"{title} x{strength:g}"
            columns.append(Column(label, path, name, step, float(strength)))
    return columns


def parse_seeds(text: str) -> list[int]:
    from ..trainer.errors import TrainingError

    try:
        seeds = [int(x) for x in (text or "").replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise TrainingError(f"{NODE}: 'seeds' must be whole numbers separated by commas, got '{text}'") from None
    return seeds or [0]


class CompareLoRAs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import comfy.samplers

        return io.Schema(
            node_id="LoraLab_CompareLoRAs",
            display_name="Compare LoRAs (LoRA Lab)",
            category=f"{CATEGORY}/preview",
            description="Render the base model and each LoRA (a list, or every numbered LoRA of a run) at fixed "
                        "seeds into one labelled grid: rows are prompts, columns base and each LoRA/strength. "
                        "Saves the grid, each cell and a JSON report in the output folder.",
            inputs=[
                io.Model.Input("model", tooltip="The base model (without the LoRAs)."),
                io.Clip.Input("clip", tooltip="Its CLIP: encodes the prompts (the LoRAs' text-encoder parts are "
                              "applied to it)."),
                io.Vae.Input("vae", tooltip="Decodes the sampled latents into images."),
                io.String.Input("loras", multiline=True, default="", tooltip="LoRA files, one per line, as "
                                "LoraLoader lists them (e.g. loralab/my_lora.safetensors) or full paths."),
                io.String.Input("run_folder", default="", tooltip="A run folder (its name under "
                                "output/loralab/runs, or a path): adds all of its numbered LoRAs, by step. Empty: "
                                "only the 'loras' list."),
                io.String.Input("strengths", default="1.0", tooltip="LoRA strengths, comma-separated: one column "
                                "per LoRA and strength (applied to the model and the CLIP, as LoraLoader)."),
                io.Boolean.Input("include_base", default=True, tooltip="First column: the base model."),
                io.String.Input("prompts", multiline=True, default="a photo of sks",
                                tooltip="One prompt per line; each becomes a row (per seed)."),
                io.String.Input("negative", multiline=True, default="", tooltip="Negative prompt for every image."),
                io.String.Input("seeds", default="0", tooltip="Fixed seeds, comma-separated: each prompt gets a row "
                                "per seed, the same in every column."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampling steps."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=30.0, step=0.5, tooltip="Classifier-free guidance."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="ComfyUI sampler, as in KSampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="Noise schedule, as in KSampler."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Image width in pixels."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Image height in pixels."),
                io.String.Input("filename_prefix", default="loralab/compare", tooltip="Where the grid, its cells "
                                "and the JSON report go, under ComfyUI's output folder (a counter is added)."),
            ],
            outputs=[io.Image.Output(display_name="grid", tooltip="The labelled grid."),
                     io.String.Output(display_name="report", tooltip="Path of the JSON report.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, loras, run_folder, strengths, include_base, prompts, negative, seeds, steps,
                cfg, sampler_name, scheduler, width, height, filename_prefix) -> io.NodeOutput:
        import comfy.sd
        import comfy.utils
        import folder_paths

        from ..trainer.errors import TrainingError
        from .preview_node import make_grid, parse_prompts, parse_strengths, pil_to_image_tensor, sample_one

        prompt_list = parse_prompts(prompts)
        if not prompt_list:
            raise TrainingError(f"{NODE}: 'prompts' is empty; write at least one prompt (one per line)")
        columns = plan_columns(lora_files(loras, run_folder), parse_strengths(strengths), include_base)
        rows = [(p, s) for p in prompt_list for s in parse_seeds(seeds)]
        images: list[list] = [[] for _ in rows]
        bar = comfy.utils.ProgressBar(len(rows) * len(columns))
        loaded: dict[Path, dict] = {}
        for column in columns:
            column_model, column_clip = model, clip
            if column.file is not None:
                if column.file not in loaded:
                    loaded[column.file] = comfy.utils.load_torch_file(str(column.file), safe_load=True)
                column_model, column_clip = comfy.sd.load_lora_for_models(model, clip, loaded[column.file],
                                                                           column.strength, column.strength)
            for r, (prompt, seed) in enumerate(rows):
                images[r].append(sample_one(column_model, column_clip, vae, prompt, negative, seed, steps, cfg,
                                            sampler_name, scheduler, width, height))
                bar.update(1)
        several_seeds = len({s for _, s in rows}) > 1
        row_labels = [f"{p} (seed {s})" if several_seeds else p for p, s in rows]
        grid = make_grid(images, row_labels, [c.label for c in columns])

        output = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, output)
        stem = f"{name}_{counter:05d}_"
        report_path = _write_outputs(Path(folder), stem, grid, images, rows, columns, {
            "steps": steps, "cfg": cfg, "sampler": sampler_name, "scheduler": scheduler, "width": width,
            "height": height, "negative": negative})
        image = pil_to_image_tensor(grid)
        saved = ui.SavedImages([ui.SavedResult(f"{stem}.png", subfolder, io.FolderType.output)])
        return io.NodeOutput(image, str(report_path), ui=saved)


def _write_outputs(folder: Path, stem: str, grid, images, rows, columns: list[Column], settings: dict) -> Path:
    """The grid, every cell and the JSON report (atomic writes); returns the report's path."""
    from PIL import Image

    from ..trainer.files.atomic import write_text, write_with

    cells = []
    for r, (prompt, seed) in enumerate(rows):
        for c, column in enumerate(columns):
            rel = f"{stem}/r{r + 1:02d}_c{c + 1:02d}.png"
            pixels = (images[r][c].clamp(0, 1) * 255).round().byte().numpy()
            write_with(folder / rel, lambda p, px=pixels: Image.fromarray(px).save(p, format="PNG"))
            cells.append({"row": r, "column": c, "label": column.label,
                          "file": str(column.file) if column.file else None, "lora": column.name or None,
                          "step": column.step, "strength": column.strength if column.file else 0.0,
                          "seed": seed, "prompt": prompt, "image": rel})
    write_with(folder / f"{stem}.png", lambda p: grid.save(p, format="PNG"))
    report = {
        "grid": f"{stem}.png", "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loras": list(dict.fromkeys(str(c.file) for c in columns if c.file)),
        "columns": [{"label": c.label, "file": str(c.file) if c.file else None, "lora": c.name or None,
                     "step": c.step, "strength": c.strength if c.file else 0.0} for c in columns],
        "rows": [{"prompt": p, "seed": s} for p, s in rows], "settings": settings, "cells": cells,
    }
    path = folder / f"{stem}.json"
    write_text(path, json.dumps(report, indent=1))
    return path
