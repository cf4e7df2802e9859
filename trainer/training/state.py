"""Resumable training state in a run folder.

    <run>/config.json               the full training config (+ dataset/bucket settings)
    <run>/state/step_000120/        one complete snapshot: adapters.safetensors, training.pt, meta.json
    <run>/history.jsonl, latest.json, previews/, loss.png   (trainer/monitor/runlog.py)

A snapshot folder is written under a temporary name and renamed when complete, so a crash or Stop mid-save
never leaves a half snapshot that resume would pick up. Only the newest `keep_last` snapshots are kept.

A snapshot holds no random-generator state: every random draw is keyed by its place in the batch order
(``data/batching.py``), so the batch sampler's position is all a resume needs to draw the same numbers again.
Snapshots written before that (with an ``rng`` entry) still load; the entry is ignored.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import TrainingError

STATE_DIR = "state"
SNAPSHOT_PREFIX = "step_"


def snapshot_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / STATE_DIR / f"{SNAPSHOT_PREFIX}{step:06d}"


def list_snapshots(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / STATE_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(SNAPSHOT_PREFIX)
             and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(SNAPSHOT_PREFIX):]))


def latest_snapshot(run_dir: str | Path) -> Optional[Path]:
    found = list_snapshots(run_dir)
    return found[-1] if found else None


def save_snapshot(run_dir: str | Path, step: int, adapters: dict[str, torch.Tensor], training: dict[str, Any],
                  meta: dict[str, Any], keep_last: int = 3) -> Path:
    """Write a complete snapshot atomically (temp folder + rename) and prune old ones."""
    from safetensors.torch import save_file

    final = snapshot_dir(Path(run_dir), step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in adapters.items()}, str(tmp / "adapters.safetensors"))
        torch.save(training, tmp / "training.pt")
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=1, default=str))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep_last > 0:
        for old in list_snapshots(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_snapshot(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        adapters = load_file(str(path / "adapters.safetensors"))
        training = torch.load(path / "training.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any damage means the snapshot cannot be resumed
        raise TrainingError(f"resume state '{path}' is damaged or incomplete ({e}); "
                            f"delete it to resume from the previous snapshot") from e
    return adapters, training, meta


def snapshot_adapters(path: str | Path) -> dict[str, torch.Tensor]:
    """Only the adapter tensors of a snapshot (kohya keys, fp32): what a numbered LoRA file is made of."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapters.safetensors"))


def check_resumable(meta: dict[str, Any], identity, path: Path) -> list[str]:
    """May the run saved with ``meta`` continue as the run ``identity`` (a :class:`RunIdentity`)?

    Another model or other settings would silently train something else: refused, naming which. Changed data is
    allowed (a dataset grows while a LoRA trains); the returned notes say so, for the node's text and the log."""
    from .identity import RunIdentity

    saved = RunIdentity.from_dict(meta.get("identity"))
    if saved is None:
        raise TrainingError(f"'{path}' was saved by an older LoRA Lab that did not record the run's identity, so it "
                            "cannot be checked against this model and these settings; start a new run (another "
                            "run name or output folder)")
    changed = saved.differences(identity)
    if "model" in changed:
        raise TrainingError(
            f"'{path}' was trained on a different model (its weights, the LoRAs or patches applied to it, its text "
            "encoder or its noise schedule / prediction type differ); load the same model, or start a new run")
    if "settings" in changed:
        raise TrainingError(
            f"'{path}' was made with different training settings; restore the settings of that run (its "
            "config.json), or start a new run. Steps, save_every, keep_last, output dtype, gradient checkpointing "
            "and previews may change freely")
    if "data" in changed:
        return ["resuming onto a changed dataset (images, crops, captions or caption options differ from the saved "
                "run): training continues from the saved state on the new data"]
    return []
