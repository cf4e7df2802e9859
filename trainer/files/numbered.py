"""Numbered intermediate LoRAs: ``<name>-<step:06d>.safetensors`` at every ``save_every`` step and at the end.

Each is an ordinary LoRA file (kohya keys, metadata with ``ss_steps`` = its step) in the folder the front-end
chooses: Train LoRA writes them under ``models/loras/loralab/<run folder>/`` so LoraLoader lists every checkpoint;
headless next to ``output.lora``. The run folder keeps a manifest (``numbered_loras.json``: step and file of each),
which Compare LoRAs' run-folder mode reads. The files hold the trained weights (not the EMA).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .atomic import write_text

MANIFEST = "numbered_loras.json"
STEP_SUFFIX = re.compile(r"-(\d{6,})$")


@dataclass(frozen=True)
class NumberedLoRAs:
    folder: Path
    name: str
    dtype: str = "fp16"

    def path(self, step: int) -> Path:
        return Path(self.folder) / f"{self.name}-{int(step):06d}.safetensors"


def step_of(path: str | Path) -> Optional[int]:
    """The step in a numbered LoRA's file name (``my_lora-000250.safetensors`` -> 250), or None."""
    match = STEP_SUFFIX.search(Path(path).stem)
    return int(match.group(1)) if match else None


def write_numbered(spec: NumberedLoRAs, run_dir: str | Path, step: int, tensors: dict, metadata: dict) -> Path:
    """Write the LoRA of ``step`` (atomically) and record it in the run folder's manifest."""
    from .lora_file import save_lora

    path = save_lora(spec.path(step), tensors, metadata, dtype=spec.dtype)
    entries = {e["step"]: e for e in read_manifest(run_dir)}
    entries[int(step)] = {"step": int(step), "file": str(path)}
    write_text(Path(run_dir) / MANIFEST, json.dumps(sorted(entries.values(), key=lambda e: e["step"]), indent=1))
    return path


def read_manifest(run_dir: str | Path) -> list[dict]:
    """Every numbered LoRA the run recorded (``{"step", "file"}``, by step); files may since have been deleted."""
    try:
        data = json.loads((Path(run_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    rows = [e for e in (data if isinstance(data, list) else [])
            if isinstance(e, dict) and isinstance(e.get("step"), int) and isinstance(e.get("file"), str)]
    return sorted(rows, key=lambda e: e["step"])


def existing_numbered(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, file) of the run's numbered LoRAs that are on disk, by step."""
    return [(e["step"], Path(e["file"])) for e in read_manifest(run_dir) if Path(e["file"]).is_file()]
