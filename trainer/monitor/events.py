"""Progress events: the versioned payload the Train LoRA node streams to the browser (see ARCHITECTURE.md, "Progress events").

The engine builds payloads with :class:`ProgressReporter` and hands them to an ``emit`` callable. Inside ComfyUI the
node passes ``lambda p: PromptServer.instance.send_sync(EVENT_TYPE, p, client_id)``; headless runs pass a logger, a
list's ``append`` or :meth:`trainer.monitor.runlog.RunLog.write_latest`. This module never imports ComfyUI, and imports torch
only to read CUDA/MPS memory counters.

Payload (``v`` = :data:`SCHEMA_VERSION`)::

    {v, node, run, phase, step, total, loss, loss_ema, lr, it_per_s, eta_s, eta_detail,
     mem: {device, allocated, reserved, peak, total}, message?, preview?}

* ``phase`` is one of :data:`PHASES`. ``step``/``total`` always count optimizer steps (caching progress goes in
  ``message``). ``loss``/``loss_ema``/``lr``/``it_per_s``/``eta_s`` are floats or ``None`` (JSON ``null``) when not
  known yet; non-finite values are sent as ``None`` (``NaN`` is not valid JSON for the browser).
* ``mem`` values are bytes (ints). On the CPU: process RSS as allocated and reserved, peak RSS, machine RAM as total,
  ``device: "cpu"``. Once the pre-flight estimate is made, ``mem.estimate`` (bytes, comparable with ``peak``: the
  estimated tensor peak on a GPU, the estimated process peak on the CPU) is added, so the panel can mark it.
* ``message`` is present when the engine has a line for the user (caching progress, the error text);
  ``preview`` is present in the event that announces a new preview image: a URL path of the previews route
  (:func:`preview_url`).

Throttling: at most one event per ``min_interval`` (0.25 s, i.e. <= 4 per second) for ordinary updates. Dropped
updates are not queued: the next event that goes out carries the latest values. Phase changes, new previews and
terminal events (done / stopped / error) are always sent at once.

Loss EMA: bias-corrected exponential moving average with ``beta = 0.98`` (:data:`EMA_BETA`, half-life about 34
steps, the same constant the JS panel and the loss plot use)::

    m_t = beta * m_{t-1} + (1 - beta) * loss_t,  m_0 = 0;      loss_ema_t = m_t / (1 - beta ** t)

where ``t`` counts the finite losses seen so far (non-finite losses are skipped). The correction removes the pull
towards 0 of the first steps, so the first EMA value equals the first loss.

Speed: ``it_per_s`` is the step rate over a sliding window of the last :data:`RATE_WINDOW` step reports
(``(step_last - step_first) / (t_last - t_first)``); the window restarts after any non-training phase so the time
spent on previews or saving does not count as slow steps.

ETA: the steps left at that rate plus the previews and saves still to come, each at the measured cost of the last
one (a preview renders images with the sampler and can take far longer than all the steps together)::

    eta_s = (total - step) / it_per_s + previews_left * preview_cost_s + saves_left * save_cost_s
            (+ what is left of a preview or save in progress)

``eta_detail`` = ``{training_s, previews_left, preview_cost_s, saves_left, save_cost_s}`` says what it is made of.
A cost is measured from entering the "preview" / "saving" phase to leaving it; until the first one is measured it is
``None`` and ``eta_s`` counts only what is known (the panel then says "+ N previews"). ``previews_left`` counts the
multiples of ``preview_every`` in (step, total] (a preview also runs at the last step); ``saves_left`` the multiples of
``save_every`` in (step, total) (the loop's periodic snapshots; the final save is not counted). The loop saves and
then previews right after it reports a step, so while the phase is still "training" those of the current step count
as to come (and the preview while "saving").
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections import deque
from dataclasses import asdict, is_dataclass
from typing import Any, Callable, Iterable, Optional
from urllib.parse import quote

log = logging.getLogger("loralab")

EVENT_TYPE = "loralab.progress"
SCHEMA_VERSION = 1
PHASES = ("caching", "encoding", "training", "preview", "saving", "done", "stopped", "error")
TERMINAL_PHASES = frozenset({"done", "stopped", "error"})
EMA_BETA = 0.98
RATE_WINDOW = 32
MEM_KEYS = ("device", "allocated", "reserved", "peak", "total")
COSTED_PHASES = ("preview", "saving")  # phases whose duration is measured and counted in the ETA

Payload = dict


# ----------------------------------------------------------------------------------------------------------- helpers
def finite_or_none(x: Any) -> Optional[float]:
    """float(x) when it is a finite number, else None (tensors are accepted: ``.item()`` is called)."""
    if x is None:
        return None
    try:
        if hasattr(x, "item"):
            x = x.item()
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


class LossEMA:
    """Bias-corrected EMA of the loss (see the module docstring). Non-finite values are ignored."""

    def __init__(self, beta: float = EMA_BETA):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"EMA beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.m = 0.0
        self.count = 0

    def update(self, loss: Any) -> Optional[float]:
        x = finite_or_none(loss)
        if x is not None:
            self.m = self.beta * self.m + (1.0 - self.beta) * x
            self.count += 1
        return self.value

    @property
    def value(self) -> Optional[float]:
        if self.count == 0:
            return None
        return self.m / (1.0 - self.beta ** self.count)

    def reset(self) -> None:
        self.m, self.count = 0.0, 0


def ema_series(losses: Iterable[Any], beta: float = EMA_BETA) -> list[Optional[float]]:
    """The EMA after each loss of a series (None until the first finite loss); used by the plot and on resume."""
    ema = LossEMA(beta)
    return [ema.update(x) for x in losses]


def _multiples(every: int, after: int, upto: int, include_end: bool) -> int:
    """How many multiples of ``every`` lie in (after, upto] (``include_end``) or (after, upto)."""
    if every <= 0 or upto <= after:
        return 0
    last = upto if include_end else upto - 1
    return max(0, last // every - after // every)


def preview_url(run: str, name: str) -> str:
    """URL path of a preview image served by ``nodes/routes.py`` (the browser prefixes ComfyUI's API base)."""
    return f"/loralab/runs/{quote(str(run), safe='')}/previews/{quote(str(name), safe='')}"


# ------------------------------------------------------------------------------------------------------------ memory
def _peak_rss(proc) -> int:
    try:
        import resource  # POSIX only

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes, Linux: KiB
    except Exception:
        pass
    try:
        return int(getattr(proc.memory_info(), "peak_wset", 0))  # Windows
    except Exception:
        return 0


def _cpu_snapshot(label: str = "cpu") -> dict:
    import psutil

    proc = psutil.Process(os.getpid())
    rss = int(proc.memory_info().rss)
    vm = psutil.virtual_memory()
    return {
        "device": label,
        "allocated": rss,
        "reserved": rss,
        "peak": max(_peak_rss(proc), rss),
        "total": int(vm.total),
        "free": int(vm.available),
    }


def _device_str(device: Any) -> str:
    if device is None:
        return "cpu"
    return str(device)


def memory_info(device: Any = None):
    """:class:`trainer.hosts.base.MemoryInfo` for ``device`` (a torch.device, "cuda", "cuda:1", "mps", "cpu" or None).

    CUDA: ``torch.cuda.memory_allocated / memory_reserved / max_memory_allocated`` and ``mem_get_info`` (free, total).
    MPS: driver counters, machine RAM as total. Anything else: the process (RSS) and machine RAM, device "cpu".
    """
    from ..hosts.base import MemoryInfo

    return MemoryInfo(**_snapshot_full(device))


def _snapshot_full(device: Any) -> dict:
    name = _device_str(device)
    kind = name.split(":", 1)[0]
    if kind == "cuda":
        import torch

        dev = torch.device(name)
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        free, total = torch.cuda.mem_get_info(dev)
        return {
            "device": f"cuda:{dev.index}",
            "allocated": int(torch.cuda.memory_allocated(dev)),
            "reserved": int(torch.cuda.memory_reserved(dev)),
            "peak": int(torch.cuda.max_memory_allocated(dev)),
            "total": int(total),
            "free": int(free),
        }
    if kind == "mps":
        import torch

        snap = _cpu_snapshot("mps")  # unified memory: machine RAM is the budget
        allocated = int(torch.mps.current_allocated_memory())
        snap.update(allocated=allocated, reserved=int(torch.mps.driver_allocated_memory()), peak=allocated)
        return snap
    return _cpu_snapshot("cpu")


def memory_snapshot(device: Any = None) -> dict:
    """The payload's ``mem`` dict ``{device, allocated, reserved, peak, total}`` (bytes) for ``device``."""
    full = _snapshot_full(device)
    return {k: full[k] for k in MEM_KEYS}


def reset_peak_memory(device: Any = None) -> None:
    """Start a new peak: reset CUDA's ``max_memory_allocated`` counter for ``device`` (call at the start of each run).

    Without it a run's reported ``peak`` (and the OOM message's "measured" figure) is the highest of every run in
    this ComfyUI process, including ComfyUI's own sampling. A no-op elsewhere: MPS reports no peak counter, and the
    CPU's peak RSS (``ru_maxrss``) is the process's lifetime high-water mark, which cannot be reset.
    """
    name = _device_str(device)
    if name.split(":", 1)[0] != "cuda":
        return
    import torch

    dev = torch.device(name)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.reset_peak_memory_stats(dev)


def _normalize_mem(mem: Any) -> dict:
    """Accepts a mem dict, a MemoryInfo (or any dataclass with the fields) and returns the payload's ``mem``."""
    if is_dataclass(mem) and not isinstance(mem, type):
        mem = asdict(mem)
    if not isinstance(mem, dict):
        raise TypeError(f"memory source returned {type(mem).__name__}, expected a dict or MemoryInfo")
    out = {"device": str(mem.get("device", "cpu"))}
    for k in MEM_KEYS[1:]:
        v = mem.get(k, 0)
        out[k] = int(v) if v is not None else 0
    return out


_UNKNOWN_MEM = {"device": "unknown", "allocated": 0, "reserved": 0, "peak": 0, "total": 0}


# ---------------------------------------------------------------------------------------------------------- reporter
class ProgressReporter:
    """Builds, throttles and emits progress payloads for one run of one node.

    Typical use in the training loop::

        rep = ProgressReporter(emit, node=unique_id, run=run_id, total=steps, device=host.device)
        rep.phase("caching", message="caching latents 0/40")
        ...
        rep.phase("training")
        for step in range(start + 1, steps + 1):
            ...
            rep.step(step, loss, lr)           # every optimizer step; sends at most 4 events per second
        rep.preview(step, preview_url(run_id, "step_000100.png"))
        rep.phase("saving"); ...; rep.done()

    ``emit`` failures are caught (logged once); they never reach the training loop.
    """

    def __init__(
        self,
        emit: Callable[[Payload], None],
        node: str,
        run: str,
        total: int,
        min_interval: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        *,
        device: Any = None,
        memory: Optional[Callable[[], Any]] = None,
        ema_beta: float = EMA_BETA,
        rate_window: int = RATE_WINDOW,
        estimate: Optional[int] = None,
        preview_every: int = 0,
        save_every: int = 0,
    ):
        self._emit = emit
        self.node = "" if node is None else str(node)
        self.run = str(run)
        self.total = int(total)
        self.min_interval = float(min_interval)
        self._clock = clock
        self._device = device
        self._memory = memory
        self.estimate = estimate  # bytes: the pre-flight estimate of the peak, sent as mem.estimate
        self.ema = LossEMA(ema_beta)
        self.preview_every = max(0, int(preview_every or 0))  # the loop's cadences, for the ETA
        self.save_every = max(0, int(save_every or 0))
        self.costs: dict[str, float] = {}  # "preview" / "saving" -> seconds the last one took
        self._phase_since: Optional[float] = None  # when the current phase was entered
        self._cost_final = False  # the current phase's cost is already known exactly (a preview's image arrived)

        self._phase: Optional[str] = None
        self._step = 0
        self._loss: Optional[float] = None
        self._lr: Optional[float] = None
        self._message: Optional[str] = None
        self._preview: Optional[str] = None  # pending: goes out with the next event, then cleared
        self._rate: Optional[float] = None
        self._window: deque = deque(maxlen=max(2, int(rate_window)))

        self._last_sent: Optional[float] = None
        self._dirty = False  # something changed since the last event
        self._emit_failed = False
        self._mem_failed = False
        self._pending_mem: Any = None  # a mem value given with a non-step report, used by the next event
        self.sent = 0
        self.dropped = 0
        self.last_payload: Optional[Payload] = None

    # ------------------------------------------------------------------------------------------------ state updates
    @property
    def it_per_s(self) -> Optional[float]:
        return self._rate

    def _enter(self, phase: str, now: Optional[float] = None, after_step: bool = False) -> None:
        """Switch to ``phase``; leaving a preview or a save records what it cost (for the ETA). ``after_step``: the
        phase is left by a step report, so one step's compute ran in the interval and is not part of the cost."""
        now = self._clock() if now is None else now
        if self._phase in COSTED_PHASES and self._phase_since is not None and not self._cost_final:
            spent = now - self._phase_since
            if after_step and self._rate:
                spent -= 1.0 / self._rate
            self.costs[self._phase] = max(0.0, spent)
        self._phase = phase
        self._phase_since = now
        self._cost_final = False

    def eta_detail(self, now: Optional[float] = None) -> dict:
        """What the ETA is made of (see the module docstring); ``training_s`` is None until the rate is known."""
        rate = self._rate
        left = max(0, self.total - self._step)
        training = left / rate if rate is not None and rate > 0 and self.total > 0 else None
        step, phase = self._step, self._phase
        previews = _multiples(self.preview_every, step, self.total, include_end=True)
        saves = _multiples(self.save_every, step, self.total, include_end=False)
        # The loop saves, then previews, right after reporting a step: those of this very step are still to come.
        if step > 0 and phase in ("training", "saving") and self.preview_every and step % self.preview_every == 0:
            previews += 1
        if step > 0 and phase == "training" and self.save_every and step % self.save_every == 0 and step < self.total:
            saves += 1
        return {"training_s": finite_or_none(training), "previews_left": previews,
                "preview_cost_s": finite_or_none(self.costs.get("preview")), "saves_left": saves,
                "save_cost_s": finite_or_none(self.costs.get("saving"))}

    def _eta(self, detail: dict) -> Optional[float]:
        if detail["training_s"] is None:
            return None
        eta = detail["training_s"]
        for count, cost in ((detail["previews_left"], detail["preview_cost_s"]),
                            (detail["saves_left"], detail["save_cost_s"])):
            if cost is not None:
                eta += count * cost
        if self._phase in COSTED_PHASES and self._phase_since is not None:
            cost = self.costs.get(self._phase)
            if cost is not None:  # the rest of the preview / save running now
                eta += max(0.0, cost - (self._clock() - self._phase_since))
        return max(0.0, eta)

    def resume(self, step: int, losses: Iterable[Any] = ()) -> None:
        """Continue a run at ``step``: replays the earlier losses (``read_history(run_dir)["loss"]``) into the EMA
        so the resumed EMA is the one an uninterrupted run would have had."""
        self.ema.reset()
        for x in losses:
            self.ema.update(x)
        self._step = int(step)
        self._window.clear()
        self._rate = None

    def phase(self, phase: str, message: Optional[str] = None, *, total: Optional[int] = None) -> bool:
        """Enter ``phase`` (always sent when it differs from the current phase, and always for terminal phases).

        Re-announcing the current phase only updates ``message`` (throttled) — handy for caching progress."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {', '.join(PHASES)}")
        if total is not None:
            self.total = int(total)
        changed = phase != self._phase
        if changed:
            self._enter(phase)
            self._message = message
            self._window.clear()  # time spent outside training does not count as slow steps
        elif message is not None:
            self._message = message
        self._dirty = True
        return self._maybe_send(force=changed or phase in TERMINAL_PHASES)

    def message(self, text: Optional[str]) -> bool:
        """Update the message line of the current phase (throttled)."""
        self._message = text
        self._dirty = True
        return self._maybe_send(force=False)

    def step(self, step: int, loss: Any = None, lr: Any = None, *, mem: Any = None) -> bool:
        """Record optimizer step ``step`` (1-based) with its loss and learning rate. Returns True if an event went out.

        Enters the "training" phase (sending it) if another phase was current."""
        step = int(step)
        now = self._clock()
        self._step = step
        self._loss = finite_or_none(loss)
        self.ema.update(loss)
        if lr is not None:
            self._lr = finite_or_none(lr)
        self._window.append((now, step))
        if len(self._window) >= 2:
            (t0, s0), (t1, s1) = self._window[0], self._window[-1]
            if t1 > t0 and s1 >= s0:
                self._rate = (s1 - s0) / (t1 - t0)
        self._dirty = True
        if self._phase != "training":
            self._enter("training", now, after_step=True)
            self._message = None
            return self._maybe_send(force=True, mem=mem)
        return self._maybe_send(force=False, mem=mem)

    def preview(self, step: Optional[int], url: str, message: Optional[str] = None) -> bool:
        """Announce a new preview image (always sent, phase "preview")."""
        if step is not None:
            self._step = int(step)
        self._preview = str(url)
        if self._phase != "preview":
            self._window.clear()
            self._enter("preview")
        elif self._phase_since is not None:  # the image is the end of the preview: its exact cost
            self.costs["preview"] = max(0.0, self._clock() - self._phase_since)
            self._cost_final = True
        self._message = message
        self._dirty = True
        return self._maybe_send(force=True)

    def report(self, phase: str, *, step: Optional[int] = None, loss: Any = None, lr: Any = None, mem: Any = None,
               message: Optional[str] = None, preview: Optional[str] = None, total: Optional[int] = None) -> bool:
        """One entry point for loops: ``report("training", step=s, loss=l, lr=lr, mem=host.memory())`` records an
        optimizer step (throttled); any other phase is sent at once when it changes. ``mem`` may be a mem dict or a
        :class:`trainer.hosts.base.MemoryInfo` (or a callable returning one, called only when an event goes out)."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {', '.join(PHASES)}")
        if total is not None:
            self.total = int(total)
        if phase == "training" and step is not None and (loss is not None or step != self._step):
            sent = self.step(step, loss, lr, mem=mem)
            if message is not None:
                self._message = message
                self._dirty = True
            return sent
        if step is not None:
            self._step = int(step)
        if loss is not None and finite_or_none(loss) != self._loss:
            self._loss = finite_or_none(loss)
        if lr is not None:
            self._lr = finite_or_none(lr)
        if mem is not None:
            self._pending_mem = mem
        if phase == "preview" and preview is not None:
            return self.preview(step, preview, message)
        if preview is not None:
            self._preview = str(preview)
        return self.phase(phase, message)

    def done(self, message: Optional[str] = None) -> bool:
        return self.phase("done", message)

    def stopped(self, message: Optional[str] = None) -> bool:
        return self.phase("stopped", message)

    def error(self, message: str) -> bool:
        return self.phase("error", message)

    def flush(self) -> bool:
        """Send the latest values now if a throttled update is still unsent."""
        if self._dirty and self._phase is not None:
            return self._maybe_send(force=True)
        return False

    # -------------------------------------------------------------------------------------------------- sending
    def _maybe_send(self, force: bool, mem: Any = None) -> bool:
        if self._phase is None:
            return False
        now = self._clock()
        if not force and self._last_sent is not None and now - self._last_sent < self.min_interval:
            self.dropped += 1
            return False
        if mem is None:
            mem = self._pending_mem
        self._pending_mem = None
        payload = self.payload(mem=mem)
        self._last_sent = now
        self._dirty = False
        self._preview = None
        self.last_payload = payload
        self.sent += 1
        try:
            self._emit(payload)
        except Exception:  # a closed socket or a full disk must never stop training
            if not self._emit_failed:
                self._emit_failed = True
                log.warning("LoRA Lab: sending a progress event failed (further failures are not logged)",
                            exc_info=True)
        return True

    def _mem(self, mem: Any = None) -> dict:
        try:
            if mem is None:
                mem = self._memory() if self._memory is not None else memory_snapshot(self._device)
            elif callable(mem):
                mem = mem()
            return _normalize_mem(mem)
        except Exception:
            if not self._mem_failed:
                self._mem_failed = True
                log.warning("LoRA Lab: reading memory usage failed (further failures are not logged)", exc_info=True)
            return dict(_UNKNOWN_MEM)

    def payload(self, mem: Any = None) -> Payload:
        """The payload for the current state (does not send or count against the throttle)."""
        rate = self._rate
        detail = self.eta_detail()
        eta = self._eta(detail)
        if self._phase in TERMINAL_PHASES:
            eta = 0.0 if self._phase == "done" else None
        p: Payload = {
            "v": SCHEMA_VERSION,
            "node": self.node,
            "run": self.run,
            "phase": self._phase,
            "step": int(self._step),
            "total": int(self.total),
            "loss": self._loss,
            "loss_ema": self.ema.value,
            "lr": self._lr,
            "it_per_s": finite_or_none(rate),
            "eta_s": finite_or_none(eta),
            "eta_detail": detail,
            "mem": self._mem(mem),
        }
        if self.estimate is not None:
            p["mem"]["estimate"] = int(self.estimate)
        if self._message is not None:
            p["message"] = str(self._message)
        if self._preview is not None:
            p["preview"] = self._preview
        return p


def fanout(*emits: Optional[Callable[[Payload], None]]) -> Callable[[Payload], None]:
    """One emit that calls several (e.g. the websocket and ``RunLog.write_latest``); one failing does not stop the
    others. The first failure of each is logged."""
    targets = [e for e in emits if e is not None]
    failed: set[int] = set()

    def emit(payload: Payload) -> None:
        for i, target in enumerate(targets):
            try:
                target(payload)
            except Exception:
                if i not in failed:
                    failed.add(i)
                    log.warning("LoRA Lab: progress sink %r failed (further failures are not logged)", target,
                                exc_info=True)

    return emit
