"""How many CPU threads the demo's training uses.

torch starts one thread per core. The demo's model is tiny: its convolutions are split into slivers that finish in
microseconds, so every parallel region waits for its slowest thread, and on a machine whose cores are busy with other
work that thread is the one the scheduler has just put aside. Many threads then make each step several times slower
than one thread would (``bench/demo_threads.py`` measures it). The demo therefore uses the cores that are idle right
now (measured over a quarter of a second), shared between the processes of a launcher (torchrun), and at most
:data:`MAX_DEMO_THREADS`, beyond which a model this small gains nothing. ``OMP_NUM_THREADS`` set by the user wins.
"""
from __future__ import annotations

import math
import os
from typing import Optional

MAX_DEMO_THREADS = 4
SAMPLE_SECONDS = 0.25


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a container's quota of cores)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def idle_cpus(cpus: int, sample_seconds: float = SAMPLE_SECONDS) -> float:
    """How many of ``cpus`` are idle now: the machine's idle share over ``sample_seconds``."""
    import psutil

    busy = psutil.cpu_percent(interval=sample_seconds) / 100.0
    return max(0.0, cpus * (1.0 - busy))


def demo_threads(cpus: Optional[int] = None, idle: Optional[float] = None, processes: Optional[int] = None) -> int:
    """Threads for one demo process: the idle cores (rounded, at least 1) shared by the launcher's processes on this
    machine (``LOCAL_WORLD_SIZE``), at most :data:`MAX_DEMO_THREADS`."""
    cpus = usable_cpus() if cpus is None else cpus
    idle = idle_cpus(cpus) if idle is None else idle
    processes = processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    share = min(float(cpus), idle) / max(1, processes)
    return int(max(1, min(MAX_DEMO_THREADS, math.floor(share + 0.5))))


def use_demo_threads(echo=print) -> int:
    """Set torch's thread count for the demo (unless ``OMP_NUM_THREADS`` is set); returns the count in use."""
    import torch

    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    threads = demo_threads()
    torch.set_num_threads(threads)
    echo(f"using {threads} CPU thread(s) of {usable_cpus()} (the idle ones; set OMP_NUM_THREADS to choose)")
    return threads
