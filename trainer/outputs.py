"""A run's optional outputs besides its folder: numbered intermediate LoRAs and TensorBoard logging.

``Run`` asks for them (``numbered`` / ``tensorboard``); :func:`attach` chains them onto the loop's hooks, after the
front-end's own callbacks, so the loop knows nothing about either. Only the writing process (rank 0) attaches them.

* Numbered LoRAs (``files/numbered.py``): at every ``save_every`` step and at the last step, the snapshot's adapters
  become ``<name>-<step:06d>.safetensors`` with the metadata of that step. A Stop between two of those steps writes
  none (the resumable state is kept as always).
* TensorBoard (``monitor/tensorboard.py``): every step's scalars and every preview image, in ``<run>/tensorboard``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional


def numbered_step(step: int, save_every: int, steps: int) -> bool:
    """Does ``step`` get a numbered LoRA: every ``save_every`` steps (when > 0), and the last one."""
    return step == steps or (save_every > 0 and step % save_every == 0)


def attach(hooks, *, run_dir: Path, cfg, numbered=None, metadata: Optional[Callable[[int], dict]] = None,
           tensorboard=None):
    """``hooks`` with the numbered-LoRA writer (``numbered``: a NumberedLoRAs, ``metadata(step)``: the file's
    metadata) and a TensorBoardLog (``tensorboard``) added; ``hooks`` itself when neither is asked for."""
    if numbered is None and tensorboard is None:
        return hooks
    on_save, preview, on_metrics = hooks.on_save, hooks.preview, hooks.on_metrics

    def saved(step: int, snapshot: Path) -> None:
        if on_save:
            on_save(step, snapshot)
        if numbered is not None and numbered_step(step, cfg.save_every, cfg.steps):
            from .files.numbered import write_numbered
            from .training.state import snapshot_adapters

            meta = dict(metadata(step))
            meta["modelspec.title"] = f"{meta.get('modelspec.title', numbered.name)} (step {step})"
            write_numbered(numbered, run_dir, step, snapshot_adapters(snapshot), meta)

    def previewed(step: int, network) -> Optional[str]:
        name = preview(step, network)
        if name and tensorboard is not None:
            tensorboard.preview(step, Path(run_dir) / name)
        return name

    def measured(step: int, values: dict) -> None:
        if on_metrics:
            on_metrics(step, values)
        if tensorboard is not None:
            tensorboard.step(step, values)

    return dataclasses.replace(hooks, on_save=saved, preview=previewed if preview else None, on_metrics=measured)
