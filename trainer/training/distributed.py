"""Several processes, one run: data parallelism over the adapter parameters under torchrun or accelerate launch.

``python -m trainer train`` started by a launcher (``torchrun``, ``accelerate launch``, or anything that sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) runs as one of ``WORLD_SIZE``
processes; without those variables nothing here does anything and the engine runs exactly as on one process.

How the processes share one run:

* **Every process loads the frozen base model** and builds the same adapters from the same seed; rank 0's adapter
  values are broadcast once at the start (and after a resume), so all processes provably start equal.
* **Batches.** ``train.batch_size`` is per process. The batch sampler cuts *global* batches of ``batch_size x
  processes`` samples, the same whatever the process count; process ``r`` trains the consecutive slice
  ``[r * batch_size, (r + 1) * batch_size)`` (:func:`share`). A bucket's last batch may be short: it is not padded
  and not refused, the slices are simply shorter (the last processes may get none), and every process weighs its
  loss by its share of the global batch (``its samples / global batch``), so each step is the mean over exactly the
  samples one process with the whole batch would have used. Each sample's noise, timestep, flip and caption
  variation come from a generator keyed by its place in the run (``batching.Draw``), not from a per-process stream:
  one process at batch 4 and two at batch 2 train the same run, up to floating-point summation order.
* **Gradients** are summed over the processes with ``all_reduce`` once per optimizer step, after the backward of
  every micro-batch (:func:`reduce_step`). Not ``DistributedDataParallel``: DDP wraps a module and must see its
  ``forward`` to arm its gradient hooks, but our adapters are forward hooks on the host's model (ComfyUI's or
  diffusers'), called through the host, and some of them may get no gradient at all (CLIP-L's last layer on SDXL),
  which DDP only tolerates with ``find_unused_parameters`` and an extra pass. Adapter gradients are small next to
  the forward/backward through the frozen base, so one bucketed, blocking all-reduce per step costs little (DDP's
  overlap of communication with the backward would gain little here), and with gradient accumulation it is still
  one all-reduce per optimizer step (what DDP's ``no_sync`` gives). Parameters without a gradient on any process
  keep none, so the optimizer skips them exactly as on one process.
* **The loss** travels in the same all-reduce: each process adds its weighted share, so every process gets the
  global mean, which is what the run log shows. A non-finite loss is therefore seen by all processes at once.
* **Stop.** Under a launcher, SIGINT and SIGTERM (what torchrun forwards on Ctrl-C or from a scheduler, giving
  workers 30 s before SIGKILL) do not interrupt the step: they set a flag that also travels in the all-reduce, and
  every process stops after the same step; rank 0 then writes the one resumable snapshot. Outside the training
  loop (loading, caching) they end the process as Ctrl-C does.
* **One writer.** Only rank 0 (:func:`is_main`) writes the run folder: run log, snapshots, LoRA files, loss plot,
  ``estimate.txt``, ``config.json``. Caches are filled by one writer first (:func:`one_writer_first`): rank 0
  encodes every missing latent and caption while the others wait at a barrier, then the others find every entry in
  the cache (hits cost milliseconds). Chosen over "each process encodes its share" because the caches are
  content-addressed files that persist across runs (caching is paid once per dataset, not per run), it keeps one
  writer per file and one cache report, and it needs nothing from the caching code. The price is that the other
  processes idle while rank 0 caches a new dataset, so the process-group timeout is long
  (:data:`PROCESS_GROUP_TIMEOUT`). On several machines the first process of each other machine goes next (it finds
  the entries when the cache folder is shared, or fills its own local cache), then everyone else.
* **Several machines.** ``output.run_dir`` must be on storage every machine sees: rank 0 writes the snapshots and
  every process reads them on ``--resume``; the processes check that they see the same run folder state.

Not coordinated: an out-of-memory error in one process ends the run through the launcher (it stops the others);
when it happens on rank 0 a resumable state is saved as on one process, elsewhere the last periodic snapshot
(``save_every``) is what remains.
"""
from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable, Iterator, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from ..errors import ConfigError, TrainingError

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Rank 0 may cache a large new dataset while the others wait at a barrier; torch's default (10 min for nccl) would
# end such a run. A crashed process does not leave the others waiting this long: the launcher stops them.
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)
BUCKET_ELEMENTS = 1 << 23  # gradients are all-reduced in flat float32 buckets of at most 32 MiB
T = TypeVar("T")


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def detect(environ=None) -> Optional[LaunchEnv]:
    """The launcher's environment, or None when this process was not started by one (``WORLD_SIZE`` unset)."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ and "RANK" not in environ:
        return None
    missing = [name for name in LAUNCHER_VARIABLES if not environ.get(name)]
    if missing:
        raise ConfigError(
            f"the environment looks like a distributed launch (WORLD_SIZE/RANK are set) but {', '.join(missing)} "
            "is not set; start the run with `torchrun` or `accelerate launch`, which set all of "
            f"{', '.join(LAUNCHER_VARIABLES)}, or unset WORLD_SIZE and RANK to train in one process")
    try:
        rank, world, local = int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ["LOCAL_RANK"])
        local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError as e:
        raise ConfigError(f"launcher variables must be integers: {e}") from None
    if not 0 <= rank < world:
        raise ConfigError(f"RANK = {rank} must be between 0 and WORLD_SIZE - 1 = {world - 1}")
    return LaunchEnv(rank, world, local, local_world)


def process_device(device: str, env: LaunchEnv) -> str:
    """``cuda`` means this process's own GPU (``cuda:LOCAL_RANK``); an explicit ``cuda:N`` or ``cpu`` is kept."""
    return f"cuda:{env.local_rank}" if device == "cuda" else device


@contextlib.contextmanager
def launched(device: str) -> Iterator[str]:
    """Join the launcher's process group for the body (nccl on CUDA, gloo otherwise) and yield the device this
    process trains on. Without a launcher's environment: yields ``device`` unchanged and does nothing else."""
    env = detect()
    if env is None:
        yield device
        return
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; train in one process (without a launcher)")
    device = process_device(device, env)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    previous = {sig: signal.signal(sig, _on_stop_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield device
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop.clear()
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- who am I
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """True in the one process that writes files and prints (rank 0), and always without a launcher."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE") or world_size()) if is_distributed() else 1


def global_batch_size(per_process: int) -> int:
    return int(per_process) * world_size()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def one_writer_first() -> Iterator[None]:
    """Run the body in every process, rank 0 first, then the first process of each other machine, then the rest,
    with barriers between: whatever the body writes to a cache (content-addressed, so the later ones only read it)
    is written once per file system. Does nothing special on one process."""
    if not is_distributed():
        yield
        return
    first, node_first = rank() == 0, local_rank() == 0
    if not first:
        barrier()
        if not node_first:
            barrier()
    yield
    if first:
        barrier()
    if first or node_first:
        barrier()


def check_same(value: Any, what: str) -> None:
    """Raise on every process when the processes do not all see the same ``value`` (e.g. the run folder's state)."""
    if not is_distributed():
        return
    seen: list[Any] = [None] * world_size()
    dist.all_gather_object(seen, value)
    if any(v != seen[0] for v in seen):
        raise TrainingError(
            f"the processes see different {what} (rank 0: {seen[0]!r}; this process, rank {rank()}: {value!r}). "
            "On several machines put output.run_dir on storage every machine shares")


# ------------------------------------------------------------------------------------------- the batch
def share(global_batch: Sequence[T], per_process: int, process: Optional[int] = None) -> list[T]:
    """This process's consecutive slice of a global batch (fewer, or none, when a bucket's last batch is short)."""
    process = rank() if process is None else process
    return list(global_batch[process * per_process:(process + 1) * per_process])


# ------------------------------------------------------------------------------------------- the step
def broadcast_parameters(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Give every process rank 0's values: whatever built or restored the adapters, all processes start equal."""
    if not is_distributed():
        return
    params = list(parameters)
    with torch.no_grad():
        for bucket in _buckets(params):
            flat = torch.cat([p.detach().reshape(-1).float() for p in bucket])
            dist.broadcast(flat, src=0)
            _unflatten_into(flat, bucket, lambda p, values: p.copy_(values))


def reduce_step(parameters: Iterable[torch.nn.Parameter], loss_share: float) -> float:
    """Sum the adapter gradients and the loss shares of all processes in place (one bucketed all-reduce, which
    also carries the stop flag); returns the step's global mean loss. One process: returns ``loss_share``."""
    if not is_distributed():
        return loss_share
    params = [p for p in parameters if p.requires_grad]
    device = params[0].device if params else torch.device("cpu")
    had_grad = [p.grad is not None for p in params]
    header = torch.tensor([loss_share, float(_stop.signalled), *map(float, had_grad)], dtype=torch.float32,
                          device=device)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    results: list[torch.Tensor] = []
    for bucket in _buckets([header, *grads]):
        flat = torch.cat([t.reshape(-1).float() for t in bucket])
        dist.all_reduce(flat)
        results.append(flat)
    reduced = list(_split(results, [header, *grads]))
    header, reduced = reduced[0], reduced[1:]
    for p, got_grad, summed in zip(params, header[2:].tolist(), reduced):
        p.grad = summed.to(p.dtype).view_as(p) if got_grad > 0 else None
    _stop.agreed = bool(header[1] > 0)
    return float(header[0])


def stop_agreed() -> bool:
    """True once any process was asked to stop (SIGINT / SIGTERM) and the last step's all-reduce told everyone."""
    return _stop.agreed


@contextlib.contextmanager
def stop_after_step() -> Iterator[None]:
    """Inside the training loop a stop signal waits for the end of the step (see the module docstring)."""
    _stop.deferred = True
    try:
        yield
    finally:
        _stop.clear()


class _StopState:
    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.signalled = self.agreed = self.deferred = False


_stop = _StopState()


def _on_stop_signal(signum, frame) -> None:
    if not _stop.deferred:
        raise KeyboardInterrupt  # loading or caching: stop now, nothing to save yet
    _stop.signalled = True


def _buckets(tensors: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and size + t.numel() > BUCKET_ELEMENTS:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def _split(flats: list[torch.Tensor], like: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The pieces of the flat buckets, shaped as flat views, in the order of ``like``."""
    for flat, bucket in zip(flats, _buckets(like)):
        yield from flat.split([t.numel() for t in bucket])


def _unflatten_into(flat: torch.Tensor, bucket: Sequence[torch.Tensor], assign) -> None:
    for t, values in zip(bucket, flat.split([t.numel() for t in bucket])):
        assign(t, values.view_as(t).to(t.dtype))
