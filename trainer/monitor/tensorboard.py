"""TensorBoard logging (optional: needs the ``tensorboard`` package): one event file per session in the run folder.

Every optimizer step writes ``loss``, ``loss_ema`` (the panel's bias-corrected EMA), ``lr``, ``grad_norm`` and the
memory in use and its peak (MiB); every preview its image (``preview``). The writer starts at the first step it is
given, with TensorBoard's ``purge_step`` at that step, so after a resume the steps the stopped session logged past
the snapshot are hidden and the curve is the one the run really has; the EMA continues from the run's history.

    tensorboard --logdir <runs folder>        # every run, each under its folder name
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import TrainingError
from ..preflight.naming import setting_ref
from .events import LossEMA, finite_or_none

FOLDER = "tensorboard"
SETTING = "output.tensorboard"
MIB = 1024 * 1024


def missing_message() -> Optional[str]:
    """Why TensorBoard logging cannot run here, or None when it can."""
    if importlib.util.find_spec("tensorboard") is None:
        return (f"{setting_ref(SETTING)} is on, but the tensorboard package is not installed in this Python; "
                "install it (pip install tensorboard, with the Python that runs training) or turn it off")
    return None


def require() -> None:
    message = missing_message()
    if message:
        raise TrainingError(message)


class TensorBoardLog:
    """Scalars per step and preview images, written to ``<run_dir>/tensorboard``. ``memory``: a callable returning
    the host's memory (a MemoryInfo or dict with ``allocated`` and ``peak`` bytes), or None; ``history``: one
    returning the run's history (``runlog.read_history``), for the EMA of a resumed run."""

    def __init__(self, run_dir: str | Path, memory: Optional[Callable[[], Any]] = None,
                 history: Optional[Callable[[], dict]] = None, flush_secs: int = 10):
        self.folder = Path(run_dir) / FOLDER
        self._memory, self._history, self._flush_secs = memory, history, flush_secs
        self._writer = None
        self._ema = LossEMA()

    def _open(self, step: int):
        if self._writer is None:
            require()
            from torch.utils.tensorboard import SummaryWriter

            self.folder.mkdir(parents=True, exist_ok=True)
            history = self._history() if self._history else {}
            for at, loss in zip(history.get("steps", []), history.get("loss", [])):
                if at < step:  # a resumed run's EMA goes on from the losses before this step
                    self._ema.update(loss)
            self._writer = SummaryWriter(str(self.folder), purge_step=step, flush_secs=self._flush_secs)
        return self._writer

    def step(self, step: int, metrics: dict) -> None:
        writer = self._open(step)
        loss = finite_or_none(metrics.get("loss"))
        ema = self._ema.update(loss)
        values = {"loss": loss, "loss_ema": ema, "lr": metrics.get("lr"), "grad_norm": metrics.get("grad_norm")}
        values.update(self._memory_values())
        for tag, value in values.items():
            value = finite_or_none(value)
            if value is not None:
                writer.add_scalar(tag, value, step)

    def preview(self, step: int, image_file: str | Path) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(image_file) as image:
            pixels = np.asarray(image.convert("RGB"))
        self._open(step).add_image("preview", pixels, step, dataformats="HWC")

    def _memory_values(self) -> dict:
        if self._memory is None:
            return {}
        mem = self._memory()
        mem = mem() if callable(mem) else mem
        get = mem.get if isinstance(mem, dict) else lambda key, default=None: getattr(mem, key, default)
        return {"memory/allocated_mib": (get("allocated", 0) or 0) / MIB,
                "memory/peak_mib": (get("peak", 0) or 0) / MIB}

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
