"""The run folder's persistent history, so a page reload or a resume redraws the whole loss curve.

Run folder layout (one folder per run)::

    <run_dir>/history.jsonl   one JSON object per line, appended:
                              {"step": 12, "loss": 0.1234, "lr": 0.0001, "time": 1760000000.123}   (optimizer step)
                              {"step": 100, "mark": "preview", "file": "step_000100.png", "time": ...}
                              {"step": 200, "mark": "save", "file": "my_lora_000200.safetensors", "time": ...}
                              {"step": 200, "mark": "resume", "time": ...}
    <run_dir>/latest.json     the last progress payload (trainer/monitor/events.py), replaced atomically, throttled
    <run_dir>/previews/*.png  preview images (served by nodes/routes.py)
    <run_dir>/loss.png        the loss plot (trainer/monitor/plot.py)

``history.jsonl`` is an append-only log: lines are buffered and written (flush + fsync) at least every
``flush_interval`` seconds (2 s), on every mark, on every non-training progress payload, and on close. A crash loses
at most the unflushed tail; a torn last line is ignored by :func:`read_history` and cut off when the log is opened
again. ``truncate_after(step)`` rewrites the log atomically for a resume. Non-finite losses are stored as ``null``.

:func:`read_history` replays the log: a step that is not after the previous one (a resume without
``truncate_after``) drops the entries from that step on, and a ``resume`` mark drops later entries, so the curve is
always the one the resumed run really has.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ..files import atomic
from .events import finite_or_none

HISTORY_FILE = "history.jsonl"
LATEST_FILE = "latest.json"
PREVIEWS_DIR = "previews"
PLOT_FILE = "loss.png"
ESTIMATE_FILE = "estimate.txt"  # the pre-flight memory estimate, as text (written by the training node)
MARKS = ("save", "preview", "resume")


def _dumps(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


class RunLog:
    """Appends a run's loss history to ``<run_dir>/history.jsonl`` and keeps ``latest.json``.

    Thread-safe (the websocket emit may run on another thread than the loop). Use as a context manager or call
    :meth:`close`.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        flush_interval: float = 2.0,
        latest_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / HISTORY_FILE
        self.latest_path = self.run_dir / LATEST_FILE
        self.flush_interval = float(flush_interval)
        self.latest_interval = float(latest_interval)
        self._clock = clock
        self._wallclock = wallclock
        self._lock = threading.RLock()
        self._buf: list[str] = []
        self._last_flush = clock()
        self._last_latest: Optional[float] = None
        self._file = None
        self._repair_tail()

    # ------------------------------------------------------------------------------------------------- writing
    def _repair_tail(self) -> None:
        """Cut a torn last line (a crash mid-write) so the next append starts on a fresh line."""
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            # find the last newline (read backwards in blocks)
            pos = size
            keep = 0
            while pos > 0:
                start = max(0, pos - 65536)
                f.seek(start)
                block = f.read(pos - start)
                i = block.rfind(b"\n")
                if i >= 0:
                    keep = start + i + 1
                    break
                pos = start
            f.truncate(keep)

    def _open(self):
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8", newline="\n")
        return self._file

    def _append(self, entry: dict, flush: bool = False) -> None:
        line = _dumps(entry) + "\n"
        with self._lock:
            self._buf.append(line)
            if flush or self._clock() - self._last_flush >= self.flush_interval:
                self._flush_locked()

    def log_step(self, step: int, loss: Any, lr: Any = None, time: Optional[float] = None) -> None:
        """Record one optimizer step (call it every step; writes are buffered)."""
        t = self._wallclock() if time is None else float(time)
        self._append({"step": int(step), "loss": finite_or_none(loss), "lr": finite_or_none(lr), "time": round(t, 3)})

    log = log_step  # alias

    def mark(self, step: int, mark: str, file: Optional[str] = None) -> None:
        """Record a save / preview / resume at ``step`` (flushed at once). ``file``: the preview's name inside
        ``previews/`` or the saved file's name."""
        if mark not in MARKS:
            raise ValueError(f"unknown mark {mark!r}; expected one of {', '.join(MARKS)}")
        entry: dict = {"step": int(step), "mark": mark}
        if file is not None:
            entry["file"] = str(file)
        entry["time"] = round(self._wallclock(), 3)
        self._append(entry, flush=True)

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        self._last_flush = self._clock()
        if not self._buf:
            return
        f = self._open()
        f.write("".join(self._buf))
        self._buf.clear()
        f.flush()
        try:
            os.fsync(f.fileno())
        except OSError:
            pass

    def truncate_after(self, step: int) -> None:
        """Drop every entry after ``step`` (for a resume from the state saved at ``step``); atomic."""
        with self._lock:
            self._flush_locked()
            if self._file is not None:
                self._file.close()
                self._file = None
            if not self.path.exists():
                return
            kept = [
                _dumps(e) + "\n" for e in _read_entries(self.path) if int(e.get("step", 0)) <= int(step)
            ]
            atomic.write_text(self.path, "".join(kept))

    def resume(self, step: int) -> None:
        """``truncate_after(step)`` plus a ``resume`` mark."""
        self.truncate_after(step)
        self.mark(step, "resume")

    def write_latest(self, payload: dict, force: bool = False) -> bool:
        """Store the last progress payload in ``latest.json`` (atomic). Throttled to one write per
        ``latest_interval`` while training; always written for other phases (which also flush the history).
        Usable directly as (part of) a ProgressReporter's emit."""
        phase = payload.get("phase")
        with self._lock:
            now = self._clock()
            if phase != "training":
                force = True
                self._flush_locked()
            if not force and self._last_latest is not None and now - self._last_latest < self.latest_interval:
                return False
            self._last_latest = now
            atomic.write_text(self.latest_path, json.dumps(payload, separators=(",", ":"), default=str))
            return True

    def close(self) -> None:
        with self._lock:
            self._flush_locked()
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort; close() is the contract
        try:
            self.close()
        except Exception:
            pass


# ------------------------------------------------------------------------------------------------- reading
def _read_entries(path: Path) -> list[dict]:
    """Every well-formed entry of a history file; torn or garbled lines are skipped."""
    out: list[dict] = []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return out
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            e = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(e, dict) and isinstance(e.get("step"), (int, float)) and not isinstance(e.get("step"), bool):
            out.append(e)
    return out


def read_history(run_dir: str | os.PathLike) -> dict:
    """The run's curve: ``{"steps": [...], "loss": [...], "lr": [...], "time": [...], "marks": [...]}``.

    ``steps``/``loss``/``lr``/``time`` are parallel lists (loss/lr may hold None); ``marks`` is a list of
    ``{"step", "mark", "file"?}``. An absent or empty history gives empty lists."""
    steps: list[int] = []
    loss: list[Optional[float]] = []
    lr: list[Optional[float]] = []
    times: list[Optional[float]] = []
    marks: list[dict] = []

    def drop_after(step: int) -> None:
        """Forget the old timeline after ``step`` (optimizer steps and marks with a larger step)."""
        while steps and steps[-1] > step:
            steps.pop(), loss.pop(), lr.pop(), times.pop()
        while marks and marks[-1]["step"] > step:
            marks.pop()

    for e in _read_entries(Path(run_dir) / HISTORY_FILE):
        s = int(e["step"])
        if "mark" in e:
            if e["mark"] == "resume":
                drop_after(s)
            m = {"step": s, "mark": str(e["mark"])}
            if e.get("file") is not None:
                m["file"] = str(e["file"])
            marks.append(m)
            continue
        if steps and s <= steps[-1]:  # resumed without truncate_after: step s replaces the old step s onwards
            drop_after(s - 1)
        steps.append(s)
        loss.append(finite_or_none(e.get("loss")))
        lr.append(finite_or_none(e.get("lr")))
        times.append(finite_or_none(e.get("time")))
    return {"steps": steps, "loss": loss, "lr": lr, "time": times, "marks": marks}


def read_latest(run_dir: str | os.PathLike) -> Optional[dict]:
    """The last progress payload, or None."""
    try:
        with open(Path(run_dir) / LATEST_FILE, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (FileNotFoundError, ValueError, OSError):
        return None


def read_estimate(run_dir: str | os.PathLike, limit: int = 16384) -> Optional[str]:
    """The run's pre-flight memory estimate text (at most ``limit`` characters), or None."""
    try:
        with open(Path(run_dir) / ESTIMATE_FILE, encoding="utf-8", errors="replace") as f:
            return f.read(limit)
    except OSError:
        return None
