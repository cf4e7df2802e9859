"""Memory estimate before training: what a run will need, whether it fits, and what to change if it does not.

``estimate_training_memory(host, cfg, buckets, batch_size, resident_encoders=...)`` returns a
:class:`MemoryEstimate`: a breakdown (label -> bytes), the total, the device's free memory, a verdict ("fits",
"tight", "does not fit") and suggestions ranked by how much each saves, each computed by re-estimating with that
one change. :func:`check_fits` turns "does not fit" into one :class:`TrainingError` (unless overridden) and
:func:`oom_report` explains an out-of-memory error next to the estimate. Never imports ComfyUI.

What is counted (bytes at the training peak, i.e. during the backward pass of the largest bucket):

* weights: every parameter and buffer of ``host.denoiser()`` at its real dtype; the text encoders when they stay
  resident or are trained; the VAE when it stays resident (``resident_encoders``).
* LoRA adapters, fp32: for every ``host.adapter_targets(...)`` module ``rank * (in + out)`` parameters (Linear),
  ``rank * in * kh * kw + out * rank`` (Conv2d; 3x3 convs use ``conv_rank`` when it is > 0, else ``rank``, as
  trainer/network.py does). Gradients: the same again (fp32). EMA: the same again when ``ema_decay > 0``.
* optimizer state: ``trainer.optim.optimizer_state_bytes`` when it is importable, else :data:`OPTIMIZER_STATE`
  (AdamW two fp32 moments = 8 B/param; 8-bit AdamW two uint8 moments + one fp32 absmax per 256 values;
  Lion 8-bit one; Adafactor factored row/col second moment; SGD one fp32 momentum buffer, none without momentum).
* activations: see "The activation model" below.
* framework: on a CUDA device the CUDA context (:data:`CUDA_CONTEXT_BYTES`) plus the caching allocator's slack
  (:data:`CUDA_ALLOCATOR_SLACK` x activations); on the CPU the "device" is the process, so the baseline is the
  process's resident memory measured at estimate time (Python, torch, ComfyUI, whatever else is loaded) minus the
  tensors counted above, plus glibc's heap slack (:data:`CPU_HEAP_SLACK` x activations).

The activation model
--------------------
With frozen base weights, what a training step keeps alive is what autograd saves for the backward pass: the inputs
of norms and nonlinearities, the inputs of every adapted layer (``lora_down`` needs them) and the ``rank``-wide
``lora_down`` outputs, attention's q/k/v/output/log-sum-exp (flash or memory-efficient SDPA; the math path also
keeps the ``tokens x tokens`` probabilities), and the compute-dtype copies of weights that autocast or fp8 casting
makes (a frozen weight that is cast is saved as the cast copy). Per layer type these are multiples of the layer's
output size, i.e. bytes per latent pixel, and they change with the model's widths, the adapter set, the dtype,
autocast, dropout and the attention kernel. Rather than keeping a table per architecture, the estimator *measures*
them on the loaded model: it runs the real denoiser forward (with autograd, the configured autocast, and
temporary LoRA-shaped hooks with the configured ranks) at four tiny sizes -- latent sides
:data:`TRACE_SIDES` at batch 1 and the smallest at batch 2 -- and records, through
``torch.autograd.graph.saved_tensors_hooks``, every saved tensor's storage (deduplicated; parameters excluded),
attributed to the innermost module running. For each module this fits exactly

    saved(B, P) = w + B * (a + b * P + c * P**2)          P = latent pixels = (W / 8) * (H / 8)

(w: batch-independent weight casts; a: per-sample constants such as cross-attention keys of the 77 text tokens;
b: everything spatial; c: attention probabilities of the math path -- 0 for flash/memory-efficient kernels), and
evaluates it at the largest bucket and the batch size. The per-type ``b`` values (bytes per latent pixel per
sample, by layer class) are reported in ``MemoryEstimate.activation_model``. Gradient checkpointing is traced the
same way with the host's own checkpointing switched on: the saves that remain visible are those outside the
checkpointed blocks plus the blocks' inputs, and the backward pass recomputes one block at a time, so

    saved_ckpt = saved_outside_and_block_inputs + max over blocks (saved inside the block)

(blocks are found from the checkpoint's own saved-tensor hooks, so this follows whatever the host checkpoints:
diffusers' resnets and transformer blocks, or ComfyUI's input/middle/output blocks). Text-encoder training adds a
trace of ``host.text_forward`` at batch 1 and 2.

The peak is then ``activations = ACTIVATION_PEAK_FACTOR * saved`` plus the device's overheads (framework, above).
Calibration, CPU, fp32, diffusers UNet2DConditionModel built at random in the SD1.5 layout at 0.3x width (blocks
96/192/384/384, 81 M parameters with 768-wide cross-attention; 76 M in bench/memory.py, whose text encoder is 32
wide), rank 16 "transformer" preset, AdamW, steps of ``trainer.loop.train`` or an equivalent forward/backward/AdamW:

* live tensor memory, measured as the peak-RSS rise of a step run with ``MALLOC_MMAP_THRESHOLD_=16384`` (every
  allocation its own mapping, unmapped on free, so RSS follows live bytes), against the traced saved bytes:
  256 px b1 146 MB measured / 152 MB traced; 512 px b1 581 / 577; 512 px b2 1162 / 1154 -> ACTIVATION_PEAK_FACTOR
  = 1.0. The whole engine step needs 100-140 MiB more than the counted tensors regardless of size and batch
  (bench rows under that allocator: 512 px b1, 512 px b2 checkpointed, 512 px b2 bf16) -> CPU_STEP_OVERHEAD.
* with the default glibc allocator the process's peak RSS is higher again: freed activation blocks stay in the
  heap. That excess tracks the step's *un-checkpointed* saved activations (a checkpointed step recomputes them in
  the backward pass, so it allocates and frees the same blocks): 0.54-0.97x over the five bench rows (bf16 lowest)
  -> CPU_HEAP_SLACK = 0.75. With these constants every bench row is within 9 % (see bench/memory.py).
* real-size check (not a fit): on a full-size SD1.5 UNet (860 M, bf16 weights) the trace gives 1.3 GiB of
  activations at 512 px batch 1 without checkpointing and 0.34 GiB with it; with 1.6 GiB of weights that is 3.0 /
  2.0 GiB, against 2.9 / 2.0 GiB in SimpleTuner's published SD1.x LoRA table (H100, bf16, rank 16).

On CUDA nothing here was measured (no GPU was available): CUDA_CONTEXT_BYTES and CUDA_ALLOCATOR_SLACK are typical
values; ``python bench/memory.py`` prints a GPU table (estimate less context/slack vs torch.cuda.max_memory_allocated)
when a GPU is present.

If the trace cannot run (a host whose denoiser cannot be called with dummy inputs), a fallback formula is used and
a note says so: ``bytes per latent pixel per sample = FALLBACK_BYTES_PER_PIXEL_PER_SQRT_PARAM * sqrt(params) *
element size`` (activations grow with the width, i.e. with the square root of the parameter count; the constant is
the 81 M calibration model's), times :data:`FALLBACK_CHECKPOINT_RATIO` with checkpointing.

Verdict: ``available = free + what the estimate counts that is already in memory`` (the loaded weights, the CUDA
context, on the CPU the process itself). "fits" when ``total * (1 + SAFETY_MARGIN) <= available`` and
``total * (1 + TIGHT_MARGIN) <= available``; "tight" when only the first holds; "does not fit" when
``total * (1 + SAFETY_MARGIN) > available``. :func:`check_fits` refuses "does not fit".
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import weakref
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

from .host import TrainingError

GIB = 1024 ** 3
MIB = 1024 ** 2

# --- verdict margins ---------------------------------------------------------------------------------------------
SAFETY_MARGIN = 0.10  # the estimate plus 10 % must fit in what is available, or the run is refused
TIGHT_MARGIN = 0.25  # below 25 % headroom the verdict is "tight": it should fit, but little else may run

# --- calibration constants (see the module docstring) ------------------------------------------------------------
TRACE_SIDES = (8, 16, 24)  # latent sides of the trace forwards (multiples of 8 so every UNet level divides evenly)
ACTIVATION_PEAK_FACTOR = 1.0  # peak live activation memory / traced saved bytes (measured 0.95 - 1.01)
CPU_STEP_OVERHEAD = 128 * MIB  # live memory a CPU step needs beyond the counted tensors (measured 100-140 MiB)
CPU_HEAP_SLACK = 0.75  # glibc heap kept on top of that, x the step's un-checkpointed saved activations (fitted)
CUDA_CONTEXT_BYTES = 512 * MIB  # CUDA context + cuBLAS/cuDNN handles (typical 350-600 MiB with lazy module loading)
CUDA_ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation on top of live tensors, x activations (not measured)
FALLBACK_BYTES_PER_PIXEL_PER_SQRT_PARAM = 3.83  # x element size: 138 kB/latent pixel at 81.5 M params in fp32
FALLBACK_CHECKPOINT_RATIO = 0.27  # checkpointed / plain saved activations of the 81 M model at 512 px

_EIGHT_BIT_BLOCK = 256
OPTIMIZER_STATE = {  # bytes of optimizer state per trainable parameter (fallback when trainer.optim is absent)
    "adamw": 8.0,
    "adamw8bit": 2 * (1 + 4 / _EIGHT_BIT_BLOCK),
    "lion8bit": 1 + 4 / _EIGHT_BIT_BLOCK,
    "adafactor": 1.0,  # factored second moment of rank-r matrices: (r + d) fp32 per r*d params, ~4/r B/param
    "sgd": 4.0,  # momentum buffer (0 without momentum)
}
ATTENTION_KINDS = ("sdpa", "flash", "xformers", "math")

VERDICTS = ("fits", "tight", "does not fit")


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; GiB with one decimal above 1 GiB."""
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if n >= size:
            return f"{sign}{n / size:.1f} {unit}" if unit != "MiB" or n < 100 * MIB else f"{sign}{n / size:.0f} MiB"
    return f"{sign}{int(n)} B"


# =================================================================================================== the result
@dataclass
class Suggestion:
    change: str  # what to change, naming the setting
    saves: int  # bytes saved against the current estimate
    total: int  # the estimate with this change
    verdict: str  # the verdict with this change

    def to_dict(self) -> dict[str, Any]:
        return {"change": self.change, "saves": int(self.saves), "total": int(self.total), "verdict": self.verdict}


@dataclass
class MemoryEstimate:
    breakdown: "OrderedDict[str, int]"  # label -> bytes, in display order
    total: int
    device: str
    device_total: int  # device memory (machine RAM on the CPU)
    device_free: int  # free now, as the host reports it (on the CPU: RAM available to the process)
    resident: int  # bytes of the breakdown already in memory now (loaded weights, context / process baseline)
    available: int  # device_free + resident: what the run can use at its peak
    verdict: str  # "fits" | "tight" | "does not fit"
    margin: int  # available - total * (1 + SAFETY_MARGIN); negative when refused
    suggestions: list[Suggestion] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # resolution, batch, rank, ... the estimate is for
    notes: list[str] = field(default_factory=list)
    activation_model: dict[str, Any] = field(default_factory=dict)  # per-type bytes per latent pixel, fit terms
    framework: int = 0  # the part of `total` that is not tensors (CUDA context / CPU process baseline / slack)

    @property
    def tensor_total(self) -> int:
        """What torch allocates for tensors (compare with torch.cuda.max_memory_allocated)."""
        return self.total - self.framework

    def summary(self) -> str:
        return (f"needs about {fmt_bytes(self.total)} on {self.device}, {fmt_bytes(self.available)} available: "
                f"{self.verdict}")

    def to_text(self, max_suggestions: int = 4) -> str:
        s = self.settings
        lines = [f"Memory estimate ({self.device}): {fmt_bytes(self.total)} of {fmt_bytes(self.available)} available"
                 f" -> {self.verdict.upper()}"
                 + (f" (headroom {fmt_bytes(self.margin)})" if self.margin >= 0
                    else f" (short by {fmt_bytes(-self.margin)} incl. {int(SAFETY_MARGIN * 100)} % safety)")]
        if s:
            lines.append(f"  for {s.get('largest_bucket', '?')} px, batch {s.get('batch_size')}, rank "
                         f"{s.get('rank')}, {s.get('optimizer')}, mixed precision {s.get('mixed_precision')}, "
                         f"checkpointing {'on' if s.get('gradient_checkpointing') else 'off'}")
        width = max((len(k) for k in self.breakdown), default=10)
        for label, value in self.breakdown.items():
            lines.append(f"  {label.ljust(width)}  {fmt_bytes(value):>10}")
        if self.suggestions:
            lines.append("To use less memory:")
            for sug in self.suggestions[:max_suggestions]:
                lines.append(f"  - {sug.change}: saves {fmt_bytes(sug.saves)} -> {fmt_bytes(sug.total)} "
                             f"({sug.verdict})")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": 1, "device": self.device, "total": int(self.total), "tensor_total": int(self.tensor_total),
            "device_total": int(self.device_total), "device_free": int(self.device_free),
            "resident": int(self.resident), "available": int(self.available), "verdict": self.verdict,
            "margin": int(self.margin), "safety_margin": SAFETY_MARGIN,
            "breakdown": [{"label": k, "bytes": int(v)} for k, v in self.breakdown.items()],
            "suggestions": [s.to_dict() for s in self.suggestions], "settings": dict(self.settings),
            "notes": list(self.notes), "activation_model": dict(self.activation_model),
        }


# ========================================================================================= counting parameters
def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def module_bytes(module, device=None) -> tuple[int, int]:
    """(bytes of every parameter and buffer, bytes of those that are on ``device`` now). Shared tensors once."""
    if module is None:
        return 0, 0
    seen, total, there = set(), 0, 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.device, t.data_ptr()) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        n = _tensor_bytes(t)
        total += n
        if device is not None and _same_device(t.device, device):
            there += n
    return total, there


def _same_device(a, b) -> bool:
    import torch

    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cuda":
        return (a.index or 0) == (b.index if b.index is not None else torch.cuda.current_device())
    return True


def _is_conv_kxk(module) -> bool:
    from torch import nn

    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def target_rank(module, network_cfg) -> int:
    """The rank trainer/network.py gives this target: conv_rank for non-1x1 convs when it is > 0, else rank."""
    if _is_conv_kxk(module) and network_cfg.conv_rank > 0:
        return int(network_cfg.conv_rank)
    return int(network_cfg.rank)


def target_dims(module) -> tuple[int, int]:
    """(fan in incl. kernel, fan out): a rank above min of both is meaningless (network.py refuses it)."""
    from torch import nn

    if isinstance(module, nn.Conv2d):
        return module.in_channels * math.prod(module.kernel_size), module.out_channels
    return module.in_features, module.out_features


def adapter_param_count(module, rank: int) -> int:
    """LoRA parameters for one target: Linear rank*(in+out); Conv2d rank*in*kh*kw + out*rank (1x1 up conv)."""
    from torch import nn

    if isinstance(module, nn.Conv2d):
        return rank * module.in_channels * math.prod(module.kernel_size) + module.out_channels * rank
    return rank * (module.in_features + module.out_features)


def adapter_shapes(module, rank: int) -> list[tuple[int, ...]]:
    from torch import nn

    if isinstance(module, nn.Conv2d):
        return [(rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)]
    return [(rank, module.in_features), (module.out_features, rank)]


def optimizer_state_bytes(name: str, n_params: int, shapes: Optional[Sequence[tuple[int, ...]]] = None,
                          momentum: float = 0.9) -> int:
    """Optimizer state for ``n_params`` trainable parameters: trainer.optim's estimate when available, else ours.

    Ours, with ``shapes``: Adafactor keeps a row and a column vector per tensor of >= 2 dims (factored over the last
    two dims, as transformers' Adafactor does), fp32 per value for 1-dim ones; 8-bit optimizers keep fp32 state for
    tensors under 4096 values (bitsandbytes' min_8bit_size)."""
    if name == "sgd" and momentum == 0:
        return 0
    try:
        from .optim import optimizer_state_bytes as from_optim

        return int(from_optim(name, n_params))
    except Exception:  # noqa: BLE001 - the optim module may be missing or not know the name: use our own table
        pass
    if shapes and name == "adafactor":
        total = 0
        for shape in shapes:
            if len(shape) >= 2:
                total += 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])
            else:
                total += 4 * math.prod(shape)
        return total
    if shapes and name in ("adamw8bit", "lion8bit"):
        states = 2 if name == "adamw8bit" else 1
        total = 0
        for shape in shapes:
            n = math.prod(shape)
            total += states * (4 * n if n < 4096 else n + 4 * math.ceil(n / _EIGHT_BIT_BLOCK))
        return total
    return int(math.ceil(OPTIMIZER_STATE.get(name, 8.0) * n_params))


# ================================================================================================ the trace
class _Adapters:
    """Temporary LoRA-shaped forward hooks that do what trainer/network.py's hooks do (fp32 adapters; the hook adds
    ``up(down(dropout(x.float()))) * scale`` cast to the output dtype), so autograd saves the same tensors. The
    ids of the rank-wide ``down`` outputs are recorded so their bytes can be rescaled for another rank."""

    def __init__(self, targets: Sequence[Any], ranks: Sequence[int], dropout: float):
        self.targets, self.ranks, self.dropout = list(targets), list(ranks), float(dropout)
        self.handles: list[Any] = []
        self.params: list[Any] = []
        self.down_outputs: set[int] = set()  # storage data_ptrs of down outputs in the current forward

    def __enter__(self) -> "_Adapters":
        import torch
        import torch.nn.functional as F
        from torch import nn

        try:
            for target, rank in zip(self.targets, self.ranks):
                module = target.module
                if rank <= 0 or rank > min(target_dims(module)):
                    continue  # network.py refuses these; preflight reports them
                dev = module.weight.device
                if dev.type == "meta":
                    continue
                if isinstance(module, nn.Conv2d):
                    down = torch.zeros(rank, module.in_channels, *module.kernel_size, device=dev, requires_grad=True)
                    up = torch.zeros(module.out_channels, rank, 1, 1, device=dev, requires_grad=True)

                    def first(x, down=down, m=module):
                        return F.conv2d(x, down, None, m.stride, m.padding, m.dilation)

                    def second(h, up=up):
                        return F.conv2d(h, up)
                else:
                    down = torch.zeros(rank, module.in_features, device=dev, requires_grad=True)
                    up = torch.zeros(module.out_features, rank, device=dev, requires_grad=True)

                    def first(x, down=down):
                        return F.linear(x, down)

                    def second(h, up=up):
                        return F.linear(h, up)

                def hook(_m, args, kwargs, output, first=first, second=second):
                    x = args[0] if args else next(iter(kwargs.values()))
                    x = x.to(torch.float32)
                    if self.dropout > 0:
                        x = F.dropout(x, self.dropout, training=True)
                    h = first(x)
                    self.down_outputs.add(h.untyped_storage().data_ptr())
                    return output + (second(h) * 0.5).to(output.dtype)

                self.params += [down, up]
                self.handles.append(module.register_forward_hook(hook, with_kwargs=True))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


@dataclass
class _Sample:
    """Saved bytes of one traced forward."""

    by_module: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    adapter_by_module: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # rank-wide down outputs
    region_of: dict[str, int] = field(default_factory=dict)  # module path -> checkpoint region (ckpt traces)
    total: int = 0


def _module_paths(root) -> dict[int, str]:
    return {id(m): (name or "<root>") for name, m in root.named_modules()}


def _trace_once(run, root, exclude_ptrs: set, adapters: _Adapters, want_regions: bool) -> _Sample:
    """Run ``run()`` (one forward with autograd) and account every tensor autograd saves, by module."""
    import torch

    sample = _Sample()
    paths = _module_paths(root)
    stack: list[str] = []
    seen: set[int] = set()
    regions: dict[int, int] = {}
    keep_alive: list[Any] = []  # the foreign hook tuples: keeps their ids unique while we run
    alive: list[Any] = []  # every saved tensor, held here (not by the graph) until the forward is over

    def pack(t):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            nbytes = storage.nbytes()
        except Exception:  # noqa: BLE001 - tensor subclasses without storage
            return None
        if ptr == 0 or ptr in exclude_ptrs or ptr in seen:
            return None
        seen.add(ptr)
        alive.append(t)  # keeps the storage (and so its address) unique until the forward ends
        where = stack[-1] if stack else "<outside>"
        sample.by_module[where] += nbytes
        if ptr in adapters.down_outputs:
            sample.adapter_by_module[where] += nbytes
        sample.total += nbytes
        return None  # the graph keeps nothing: returning `t` itself would make saved outputs a reference cycle

    def unpack(_):
        raise RuntimeError("the memory trace's graph cannot be used for backward")

    def pre(module, _args):
        path = paths.get(id(module), "?")
        stack.append(path)
        if want_regions:
            top = torch._C._autograd._top_saved_tensors_default_hooks(False)
            if top is not None and top[0] is not pack:
                key = id(top[0])
                if key not in regions:
                    regions[key] = len(regions)
                    keep_alive.append(top)
                sample.region_of.setdefault(path, regions[key])

    def post(_module, _args, _out):
        if stack:
            stack.pop()

    handles = []
    try:
        for module in root.modules():
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post, always_call=True))
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            out = run()
        del out
    finally:
        for h in handles:
            h.remove()
        adapters.down_outputs.clear()
        alive.clear()
        keep_alive.clear()
    return sample


def _solve(rows: list[list[float]], values: list[float]) -> list[float]:
    """Gaussian elimination for the small exact fits (4x4)."""
    n = len(rows)
    m = [list(r) + [v] for r, v in zip(rows, values)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col and m[r][col] != 0:
                f = m[r][col] / m[col][col]
                m[r] = [a - f * b for a, b in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]


_POINTS = [(1, TRACE_SIDES[0]), (1, TRACE_SIDES[1]), (1, TRACE_SIDES[2]), (2, TRACE_SIDES[0])]


def _fit(values: Sequence[float]) -> tuple[float, float, float, float]:
    """(w, a, b, c) with saved = w + B * (a + b * P + c * P^2) through the four trace points."""
    rows = []
    for batch, side in _POINTS:
        p = float(side * side)
        rows.append([1.0, batch, batch * p, batch * p * p])
    w, a, b, c = _solve(rows, [float(v) for v in values])
    return w, a, b, c


def _evaluate(coef: Sequence[float], batch: int, pixels: float) -> float:
    w, a, b, c = coef
    return max(0.0, w + batch * (a + b * pixels + c * pixels * pixels))


@dataclass
class ActivationFit:
    """Saved-for-backward bytes of the denoiser as polynomials in (batch, latent pixels), per module."""

    modules: dict[str, tuple[float, float, float, float]]  # all saves, plain trace
    adapters: dict[str, tuple[float, float, float, float]]  # the rank-wide part of them
    types: dict[str, str]  # module path -> class name
    ckpt_visible: Optional[tuple[float, float, float, float]] = None  # ckpt trace: outside + block inputs
    regions: dict[str, int] = field(default_factory=dict)  # module path -> checkpointed block
    ckpt_error: str = ""

    def saved(self, batch: int, pixels: float, checkpointing: bool, rank_scale: float = 1.0) -> tuple[float, bool]:
        """(saved bytes, whether checkpointing was modelled from a trace)."""
        def value(path):
            v = _evaluate(self.modules[path], batch, pixels)
            if rank_scale != 1.0 and path in self.adapters:
                v -= (1.0 - rank_scale) * _evaluate(self.adapters[path], batch, pixels)
            return max(0.0, v)

        if not checkpointing:
            return sum(value(p) for p in self.modules), True
        if self.ckpt_visible is None or not self.regions:
            return FALLBACK_CHECKPOINT_RATIO * sum(value(p) for p in self.modules), False
        per_region: dict[int, float] = defaultdict(float)
        for path, region in self.regions.items():
            if path in self.modules:
                per_region[region] += value(path)
        visible = _evaluate(self.ckpt_visible, batch, pixels)
        if rank_scale != 1.0:  # block inputs do not depend on the rank; outside adapters scale
            visible -= sum((1.0 - rank_scale) * _evaluate(self.adapters[p], batch, pixels)
                           for p in self.adapters if p not in self.regions)
        return max(0.0, visible) + max(per_region.values(), default=0.0), True

    def per_type_bytes_per_pixel(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for path, coef in self.modules.items():
            out[self.types.get(path, "?")] += coef[2]
        return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if abs(v) >= 0.05}


_TRACE_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_TRACE_LOCK = threading.Lock()


def _text_shapes(host) -> tuple[int, int, Optional[int]]:
    """(tokens, width, pooled width or None) of the host's text conditioning, from one encoded empty caption."""
    try:
        item = host.encode_text([""], 1)[0]
        ctx = item["context"]
        pooled = item.get("pooled")
        return int(ctx.shape[-2]), int(ctx.shape[-1]), (int(pooled.shape[-1]) if pooled is not None else None)
    except Exception:  # noqa: BLE001 - no text encoder connected: the config width is enough for SD1.5
        return 77, int(getattr(host, "context_width", 768) or 768), (1280 if host.family == "sdxl" else None)


def _dummy_inputs(host, batch: int, side: int, text: tuple[int, int, Optional[int]]):
    import torch

    from .host import Conditioning

    device, dtype = host.device, host.dtype
    tokens, width, pooled_width = text
    noisy = torch.randn(batch, host.latent_channels, side, side, device=device, dtype=torch.float32)
    schedule = getattr(host, "schedule", None)
    if getattr(schedule, "timestep_unit", "index") == "sigma":
        t = torch.full((batch,), 0.5, device=device)
    else:
        t = torch.full((batch,), 500, dtype=torch.long, device=device)
    context = torch.zeros(batch, tokens, width, device=device)
    pooled = torch.zeros(batch, pooled_width, device=device) if pooled_width else None
    size_ids = None
    if host.family == "sdxl":
        px = side * 8
        size_ids = torch.tensor([[px, px, 0, 0, px, px]] * batch, dtype=torch.float32, device=device)
    cond = Conditioning(context, pooled, size_ids)
    return noisy.to(dtype), t, cond.to(dtype=dtype)


@contextlib.contextmanager
def _grad_mode():
    import torch

    with torch.inference_mode(False), torch.enable_grad():
        yield


def _autocast(device, mixed_precision: str):
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def _attention_context(attention: str):
    if attention == "math":
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            return sdpa_kernel(SDPBackend.MATH)
        except Exception:  # noqa: BLE001 - old torch: the host's own attention is traced as is
            return contextlib.nullcontext()
    return contextlib.nullcontext()


def _exclude_ptrs(*modules) -> set:
    ptrs = set()
    for module in modules:
        if module is None:
            continue
        for t in list(module.parameters()) + list(module.buffers()):
            ptrs.add(t.untyped_storage().data_ptr())
    return ptrs


def trace_denoiser(host, targets, ranks, *, mixed_precision: str = "no", dropout: float = 0.0,
                   attention: str = "sdpa", checkpointing: bool = True) -> ActivationFit:
    """Trace the denoiser's saved activations at the small sizes and fit them (cached per model and settings).
    The checkpointed traces run only when ``checkpointing`` asks for them."""
    import torch

    denoiser = host.denoiser()
    key = (type(host).__qualname__, tuple((id(t.module), r) for t, r in zip(targets, ranks)), mixed_precision,
           dropout > 0, attention, str(host.dtype))
    with _TRACE_LOCK:
        cache = _TRACE_CACHE.setdefault(denoiser, {})
        plain = cache.get(key + ("plain",))
        ckpt = cache.get(key + ("ckpt",))
    if plain is not None and (ckpt is not None or not checkpointing):
        return replace(plain, **(ckpt or {}))
    text = _text_shapes(host)
    host_is_cpu = torch.device(host.device).type == "cpu"
    was_training = denoiser.training

    def trace_points(adapters, exclude, want_regions: bool) -> list[_Sample]:
        samples = []
        for batch, side in _POINTS:
            def run(batch=batch, side=side):
                noisy, t, cond = _dummy_inputs(host, batch, side, text)
                with _autocast(host.device, mixed_precision):
                    return host.predict(noisy, t, cond)

            samples.append(_trace_once(run, denoiser, exclude, adapters, want_regions=want_regions))
            if host_is_cpu:
                _release_heap()
        return samples

    with _grad_mode(), _Adapters(targets, ranks, dropout) as adapters, _attention_context(attention):
        exclude = _exclude_ptrs(denoiser) | {p.untyped_storage().data_ptr() for p in adapters.params}
        rng_state = torch.get_rng_state()
        try:
            if plain is None:
                samples = trace_points(adapters, exclude, want_regions=False)
                paths = set().union(*(s.by_module for s in samples))
                adapter_paths = set().union(*(s.adapter_by_module for s in samples))
                plain = ActivationFit(
                    modules={p: _fit([s.by_module.get(p, 0) for s in samples]) for p in paths},
                    adapters={p: _fit([s.adapter_by_module.get(p, 0) for s in samples]) for p in adapter_paths},
                    types={name or "<root>": type(m).__name__ for name, m in denoiser.named_modules()})
            if checkpointing and ckpt is None:
                switch = getattr(host, "gradient_checkpointing", None)
                if switch is None:
                    ckpt = {"ckpt_error": "the host has no gradient_checkpointing switch"}
                else:
                    try:
                        with switch(True):
                            samples = trace_points(adapters, exclude, want_regions=True)
                        ckpt = {"ckpt_visible": _fit([s.total for s in samples]),
                                "regions": dict(samples[1].region_of)}
                    except Exception as e:  # noqa: BLE001 - fall back to the ratio, with a note
                        ckpt = {"ckpt_error": f"{type(e).__name__}: {e}"}
        finally:
            torch.set_rng_state(rng_state)
            denoiser.train(was_training)
    with _TRACE_LOCK:
        cache = _TRACE_CACHE.setdefault(denoiser, {})
        cache[key + ("plain",)] = plain
        if ckpt is not None:
            cache[key + ("ckpt",)] = ckpt
    return replace(plain, **(ckpt or {}))


def trace_text_encoders(host, targets, ranks, *, mixed_precision: str = "no", dropout: float = 0.0,
                        clip_skip: int = 1) -> tuple[float, float]:
    """(batch-independent, per-sample) saved bytes of a text-encoder forward with adapters (text-encoder training)."""
    forward = getattr(host, "text_forward", None)
    if forward is None or not targets:
        raise RuntimeError("the host has no text_forward")
    encoders = list(host.text_encoders().values())
    values = []
    with _grad_mode(), _Adapters(targets, ranks, dropout) as adapters:
        exclude = _exclude_ptrs(*encoders) | {p.untyped_storage().data_ptr() for p in adapters.params}

        class _Root:  # attribute everything to one pseudo-module: only the total matters here
            def modules(self):
                return iter(encoders)

            def named_modules(self):
                return iter([(f"te{i}", e) for i, e in enumerate(encoders)])

        for batch in (1, 2):
            def run(batch=batch):
                with _autocast(host.device, mixed_precision):
                    return forward(["a"] * batch, clip_skip)

            values.append(_trace_once(run, _Root(), exclude, adapters, want_regions=False).total)
    per_sample = max(0.0, float(values[1] - values[0]))
    return max(0.0, values[0] - per_sample), per_sample


# ============================================================================================== the estimate
@dataclass
class _Plan:
    """One configuration to estimate (the base one, or a suggestion's variant)."""

    rank_scale: float
    batch: int
    pixels: float  # latent pixels of the largest bucket
    bucket: tuple[int, int]
    checkpointing: bool
    mixed_precision: str
    optimizer: str
    fp8_weights: bool
    resident_encoders: bool
    train_text_encoder: bool


def _largest_bucket(buckets) -> tuple[int, int]:
    """(width, height) of the largest-area bucket: a BucketConfig, a list of (w, h), or an int resolution."""
    from .config import BucketConfig

    if buckets is None:
        buckets = BucketConfig()
    if isinstance(buckets, int):
        return buckets, buckets
    if isinstance(buckets, BucketConfig):
        sizes: list[tuple[int, int]] = []
        try:
            from .buckets import make_buckets

            for res in buckets.resolutions:
                sizes += [tuple(b) for b in make_buckets(res, buckets.min_bucket, buckets.max_bucket, buckets.step)]
        except Exception:  # noqa: BLE001 - invalid bucket settings are preflight's business; assume squares
            sizes = [(r, r) for r in buckets.resolutions]
        if not sizes:
            sizes = [(512, 512)]
        return max(sizes, key=lambda s: (s[0] * s[1], s))
    sizes = [(int(w), int(h)) for w, h in buckets]
    if not sizes:
        raise ValueError("no buckets given")
    return max(sizes, key=lambda s: (s[0] * s[1], s))


def _process_rss() -> int:
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:  # noqa: BLE001
        return 0


def _cpu_available() -> Optional[int]:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001
        return None


def _vae_module(host):
    from torch import nn

    vae = getattr(host, "vae", None)
    if vae is None:
        return None
    if isinstance(vae, nn.Module):
        return vae
    inner = getattr(vae, "first_stage_model", None)  # ComfyUI's VAE wrapper
    return inner if isinstance(inner, nn.Module) else None


def _linear_conv_weights(module) -> int:
    from torch import nn

    return sum(m.weight.numel() for m in module.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d)) and getattr(m, "weight", None) is not None)


def estimate_training_memory(host, cfg, buckets=None, batch_size: Optional[int] = None, *,
                             resident_encoders: bool, attention: str = "sdpa",
                             suggest: bool = True) -> "MemoryEstimate":
    """Estimate the peak memory of training ``cfg`` on ``host``'s loaded model at the largest of ``buckets``.

    ``buckets``: a :class:`~trainer.config.BucketConfig` (its buckets are generated), or the list of (width, height)
    buckets the cached latents actually use. ``batch_size`` defaults to ``cfg.batch_size``. ``resident_encoders``:
    the text encoders and VAE stay in device memory during training (else the host offloads them; they are always
    counted when the text encoder is trained). ``attention``: "sdpa" / "flash" / "xformers" trace the host's own
    attention; "math" forces PyTorch's math SDPA kernel (keeps the tokens x tokens probabilities)."""
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention = {attention!r}; choose one of: {', '.join(ATTENTION_KINDS)}")
    batch = int(batch_size if batch_size is not None else cfg.batch_size)
    width, height = _largest_bucket(buckets)
    plan = _Plan(rank_scale=1.0, batch=max(1, batch), pixels=(width / 8) * (height / 8), bucket=(width, height),
                 checkpointing=bool(cfg.gradient_checkpointing), mixed_precision=cfg.mixed_precision,
                 optimizer=cfg.optimizer.name, fp8_weights=False, resident_encoders=bool(resident_encoders),
                 train_text_encoder=bool(cfg.network.train_text_encoder))
    ctx = _Context(host, cfg, attention)
    try:
        base = ctx.estimate(plan)
        if suggest:
            base.suggestions = ctx.suggestions(plan, base)
    finally:
        if ctx.is_cpu:
            _release_heap()
    return base


def _release_heap() -> None:
    """Give the heap the small trace forwards used back to the OS (glibc keeps freed memory otherwise)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import gc

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:  # noqa: BLE001 - musl or another libc: nothing to do
        pass


class _Context:
    """Everything that does not change between the base estimate and its variants."""

    def __init__(self, host, cfg, attention: str):
        import torch

        self.host, self.cfg, self.attention = host, cfg, attention
        self.device = torch.device(host.device)
        self.is_cuda = self.device.type == "cuda"
        self.is_cpu = self.device.type == "cpu"
        self.mem = host.memory()
        net = cfg.network
        targets = list(host.adapter_targets(net.preset, net.conv_rank > 0, net.train_text_encoder))
        self.unet_targets = [t for t in targets if t.component == "unet"]
        self.te_targets = [t for t in targets if t.component != "unet"]
        self.notes: list[str] = []
        denoiser = host.denoiser()
        self.denoiser_bytes, self.denoiser_here = module_bytes(denoiser, self.device)
        self.denoiser_linear_conv = _linear_conv_weights(denoiser)
        self.denoiser_params = sum(p.numel() for p in denoiser.parameters())
        self.weight_elem = max((p.element_size() for p in denoiser.parameters()), default=4)
        encoders = host.text_encoders() if hasattr(host, "text_encoders") else {}
        self.te_bytes, self.te_here = 0, 0
        for enc in encoders.values():
            b, h = module_bytes(enc, self.device)
            self.te_bytes += b
            self.te_here += h
        self.vae_bytes, self.vae_here = module_bytes(_vae_module(host), self.device)
        self._rss: Optional[int] = None
        self._fits: dict[tuple, Any] = {}
        self._te_fit: dict[tuple, Any] = {}

    def rss(self) -> int:
        """The process's resident memory, read once after the first trace: what the trace leaves behind (kernels
        compiled for new shapes, heap the allocator keeps) is then part of the baseline, as it is for training."""
        if self._rss is None:
            _release_heap()
            self._rss = _process_rss()
        return self._rss

    # -- adapters -----------------------------------------------------------------------------------------------
    def ranks(self, targets, scale: float) -> list[int]:
        return [max(1, int(round(target_rank(t.module, self.cfg.network) * scale))) if scale != 1.0
                else target_rank(t.module, self.cfg.network) for t in targets]

    def adapter_params(self, scale: float, with_te: bool) -> tuple[int, list[tuple[int, ...]]]:
        targets = self.unet_targets + (self.te_targets if with_te else [])
        n, shapes = 0, []
        for t, r in zip(targets, self.ranks(targets, scale)):
            if r > min(target_dims(t.module)):
                continue
            n += adapter_param_count(t.module, r)
            shapes += adapter_shapes(t.module, r)
        return n, shapes

    # -- activations --------------------------------------------------------------------------------------------
    def fit(self, mixed_precision: str, checkpointing: bool) -> Optional[ActivationFit]:
        key = (mixed_precision, checkpointing)
        if key not in self._fits:
            if (mixed_precision, not checkpointing) in self._fits and self._fits[(mixed_precision,
                                                                                   not checkpointing)] is None:
                self._fits[key] = None  # tracing already failed for this model
                return None
            try:
                self._fits[key] = trace_denoiser(
                    self.host, self.unet_targets, self.ranks(self.unet_targets, 1.0),
                    mixed_precision=mixed_precision, dropout=self.cfg.network.dropout, attention=self.attention,
                    checkpointing=checkpointing)
            except Exception as e:  # noqa: BLE001 - a host that cannot be traced gets the fallback formula
                self._fits[key] = None
                self.notes.append(f"activations from a rough formula: tracing the model failed ({type(e).__name__}:"
                                  f" {str(e)[:160]})")
        return self._fits[key]

    def compute_elem(self, mixed_precision: str) -> int:
        return 2 if mixed_precision in ("bf16", "fp16") else self.weight_elem

    def activations(self, plan: _Plan) -> tuple[float, float, dict[str, Any]]:
        """(peak activation bytes, saved bytes the same step would keep without checkpointing, details)."""
        fit = self.fit(plan.mixed_precision, plan.checkpointing)
        info: dict[str, Any] = {}
        if fit is None:
            per_pixel = FALLBACK_BYTES_PER_PIXEL_PER_SQRT_PARAM * math.sqrt(max(self.denoiser_params, 1)) \
                * self.compute_elem(plan.mixed_precision)
            plain = per_pixel * plan.pixels * plan.batch
            saved = plain * (FALLBACK_CHECKPOINT_RATIO if plan.checkpointing else 1)
            info["fallback_bytes_per_pixel"] = round(per_pixel, 1)
        else:
            saved, traced = fit.saved(plan.batch, plan.pixels, plan.checkpointing, plan.rank_scale)
            plain = fit.saved(plan.batch, plan.pixels, False, plan.rank_scale)[0] if plan.checkpointing else saved
            if plan.checkpointing and not traced:
                note = f"checkpointing modelled by a fixed ratio ({fit.ckpt_error or 'no blocks found'})"
                if note not in self.notes:
                    self.notes.append(note)
            info["bytes_per_latent_pixel_by_type"] = fit.per_type_bytes_per_pixel()
            info["bytes_per_latent_pixel"] = round(sum(c[2] for c in fit.modules.values()), 1)
            info["per_sample_constant"] = round(sum(c[1] for c in fit.modules.values()), 1)
            info["batch_independent"] = round(sum(c[0] for c in fit.modules.values()), 1)
            info["quadratic"] = sum(c[3] for c in fit.modules.values())
        if plan.fp8_weights:
            # ComfyUI's fp8 layers cast each weight to the compute dtype per call; a cast weight that autograd
            # needs is saved: all of them without checkpointing, about one block's worth with it.
            casts = self.denoiser_linear_conv * self.compute_elem(plan.mixed_precision if plan.mixed_precision != "no"
                                                                  else "bf16")
            if plan.checkpointing:
                casts *= FALLBACK_CHECKPOINT_RATIO
            info["fp8_weight_casts"] = int(casts)
            saved += casts
            plain += casts
        return saved * ACTIVATION_PEAK_FACTOR, plain, info

    def te_activations(self, plan: _Plan) -> float:
        if not plan.train_text_encoder or not self.te_targets:
            return 0.0
        key = (plan.mixed_precision, plan.rank_scale)
        if key not in self._te_fit:
            try:
                self._te_fit[key] = trace_text_encoders(
                    self.host, self.te_targets, self.ranks(self.te_targets, plan.rank_scale),
                    mixed_precision=plan.mixed_precision, dropout=self.cfg.network.dropout,
                    clip_skip=self.cfg.clip_skip)
            except Exception:  # noqa: BLE001 - ~24 saved values per token and width per layer (CLIP-like)
                per_sample = 0.0
                for enc in self.host.text_encoders().values():
                    config = getattr(enc, "config", None)
                    hidden = getattr(config, "hidden_size", 768)
                    layers = getattr(config, "num_hidden_layers", 12)
                    per_sample += 24 * 77 * hidden * layers * 4
                self._te_fit[key] = (0.0, per_sample)
        constant, per_sample = self._te_fit[key]
        return (constant + per_sample * plan.batch) * ACTIVATION_PEAK_FACTOR

    # -- one estimate -------------------------------------------------------------------------------------------
    def estimate(self, plan: _Plan) -> MemoryEstimate:
        cfg = self.cfg
        breakdown: OrderedDict[str, int] = OrderedDict()
        # What the host's modules occupy on the device now is either counted below or freed before training
        # (offloaded encoders, a model reloaded in fp8), so all of it is part of what the run can use.
        resident = self.denoiser_here + self.te_here + self.vae_here
        if plan.fp8_weights:
            weights = self.denoiser_bytes - self.denoiser_linear_conv * (self.weight_elem - 1)
            breakdown["model weights (fp8)"] = int(weights)
        else:
            breakdown["model weights"] = self.denoiser_bytes
        te_needed = plan.resident_encoders or plan.train_text_encoder
        if te_needed and self.te_bytes:
            breakdown["text encoders"] = self.te_bytes
        if plan.resident_encoders and self.vae_bytes:
            breakdown["VAE"] = self.vae_bytes
        n_adapter, shapes = self.adapter_params(plan.rank_scale, plan.train_text_encoder)
        breakdown["LoRA adapters (fp32)"] = 4 * n_adapter
        breakdown["gradients (fp32)"] = 4 * n_adapter
        breakdown[f"optimizer state ({plan.optimizer})"] = optimizer_state_bytes(
            plan.optimizer, n_adapter, shapes, cfg.optimizer.momentum)
        if cfg.ema_decay > 0:
            breakdown["EMA copy (fp32)"] = 4 * n_adapter
        acts, plain_acts, act_info = self.activations(plan)
        w, h = plan.bucket
        breakdown[f"activations ({w}x{h}, batch {plan.batch}"
                  f"{', checkpointed' if plan.checkpointing else ''})"] = int(acts)
        te_acts = self.te_activations(plan)
        if te_acts:
            breakdown["text-encoder activations"] = int(te_acts)
        tensors = sum(breakdown.values())
        framework = 0
        if self.is_cuda:
            import torch

            slack = int(CUDA_ALLOCATOR_SLACK * (acts + te_acts))
            framework = CUDA_CONTEXT_BYTES + slack
            breakdown["CUDA context + allocator slack"] = framework
            if torch.cuda.is_initialized():
                resident += CUDA_CONTEXT_BYTES
        elif self.is_cpu:
            counted_here = self.denoiser_here + (self.te_here if te_needed else 0) \
                + (self.vae_here if plan.resident_encoders else 0)
            baseline = max(0, self.rss() - counted_here)
            slack = int(CPU_STEP_OVERHEAD + CPU_HEAP_SLACK * (plain_acts + te_acts))
            framework = baseline + slack
            breakdown["process baseline (Python, torch, other data)"] = baseline
            breakdown["step overhead + allocator slack (CPU heap)"] = slack
            resident = self.rss()  # everything the process holds now is inside the estimate
        total = tensors + framework
        free = int(self.mem.free)
        if self.is_cpu:
            avail = _cpu_available()
            if avail is not None:
                free = min(free, avail) if free > 0 else avail
        elif self.is_cuda:
            try:
                import torch

                dev_free, _ = torch.cuda.mem_get_info(self.device)
                cached = max(0, int(self.mem.reserved) - int(self.mem.allocated))
                free = min(free, int(dev_free) + cached) if free > 0 else int(dev_free) + cached
            except Exception:  # noqa: BLE001
                pass
        available = free + resident
        need = total * (1 + SAFETY_MARGIN)
        if need > available:
            verdict = "does not fit"
        elif total * (1 + TIGHT_MARGIN) > available:
            verdict = "tight"
        else:
            verdict = "fits"
        settings = {
            "largest_bucket": f"{w}x{h}", "latent_pixels": int(plan.pixels), "batch_size": plan.batch,
            "rank": max(1, int(round(cfg.network.rank * plan.rank_scale))),
            "conv_rank": cfg.network.conv_rank, "preset": cfg.network.preset, "adapter_params": n_adapter,
            "adapter_targets": len(self.unet_targets) + (len(self.te_targets) if plan.train_text_encoder else 0),
            "optimizer": plan.optimizer, "mixed_precision": plan.mixed_precision,
            "gradient_checkpointing": plan.checkpointing, "weights": "fp8" if plan.fp8_weights else
            str(getattr(self.host, "dtype", "")).replace("torch.", ""), "attention": self.attention,
            "resident_encoders": plan.resident_encoders, "train_text_encoder": plan.train_text_encoder,
        }
        return MemoryEstimate(
            breakdown=breakdown, total=int(total), device=str(self.mem.device or self.device),
            device_total=int(self.mem.total), device_free=int(free), resident=int(resident),
            available=int(available), verdict=verdict, margin=int(available - need), settings=settings,
            notes=list(self.notes), activation_model=act_info, framework=int(framework))

    # -- suggestions --------------------------------------------------------------------------------------------
    def suggestions(self, plan: _Plan, base: MemoryEstimate) -> list[Suggestion]:
        cfg = self.cfg
        variants: list[tuple[str, _Plan]] = []
        rank = cfg.network.rank
        if rank >= 2:
            new_rank = max(1, rank // 2)
            conv = f" and network.conv_rank {cfg.network.conv_rank} -> {max(1, cfg.network.conv_rank // 2)}" \
                if cfg.network.conv_rank > 1 else ""
            variants.append((f"lower network.rank {rank} -> {new_rank}{conv}",
                             replace(plan, rank_scale=new_rank / rank)))
        if plan.batch > 1:
            new_batch = plan.batch // 2
            accum = cfg.optimizer.grad_accumulation * (plan.batch // new_batch)
            variants.append((f"lower batch_size {plan.batch} -> {new_batch} (set optimizer.grad_accumulation to "
                             f"{accum} to keep the effective batch)", replace(plan, batch=new_batch)))
        w, h = plan.bucket
        res = int(round(math.sqrt(w * h) / 64)) * 64
        new_res = int(res * 0.75) // 64 * 64
        if new_res >= 256:
            scale = new_res / res
            nw, nh = max(8, int(round(w * scale / 8)) * 8), max(8, int(round(h * scale / 8)) * 8)
            variants.append((f"lower the training resolution (buckets.resolutions) {res} -> {new_res}",
                             replace(plan, bucket=(nw, nh), pixels=(nw / 8) * (nh / 8))))
        if not plan.checkpointing:
            variants.append(("turn on gradient_checkpointing (about 20-40 % slower steps)",
                             replace(plan, checkpointing=True)))
        if plan.optimizer in ("adamw",):
            variants.append(("use an 8-bit optimizer: optimizer.name adamw8bit (needs bitsandbytes)",
                             replace(plan, optimizer="adamw8bit")))
        if plan.mixed_precision == "no" and self.weight_elem >= 4:
            variants.append(("set mixed_precision to bf16", replace(plan, mixed_precision="bf16")))
        if self.is_cuda and self.weight_elem >= 2 and not plan.fp8_weights:
            variants.append(("load the model with fp8 weights: ComfyUI's Load Diffusion Model node, weight_dtype "
                             "fp8_e4m3fn (the model is already loaded, so this is a loader option; slower steps)",
                             replace(plan, fp8_weights=True)))
        if plan.resident_encoders and not plan.train_text_encoder and not self.is_cpu:
            variants.append(("let the text encoders and VAE leave device memory during training (cache the text "
                             "embeddings first)", replace(plan, resident_encoders=False)))
        if plan.train_text_encoder:
            variants.append(("turn off network.train_text_encoder", replace(plan, train_text_encoder=False)))
        out, plans = [], {}
        for change, variant in variants:
            try:
                est = self.estimate(variant)
            except Exception:  # noqa: BLE001 - a variant that cannot be estimated is simply not suggested
                continue
            saves = base.total - est.total
            if saves >= 1 * MIB:
                out.append(Suggestion(change, int(saves), est.total, est.verdict))
                plans[change] = variant
        out.sort(key=lambda s: -s.saves)
        if base.verdict == "does not fit" and len(out) >= 2 and all(s.verdict == "does not fit" for s in out):
            # No single change is enough: offer the three biggest together.
            top = out[:3]
            combined = plan
            for sug in top:
                changed = {f: getattr(plans[sug.change], f) for f in plan.__dataclass_fields__
                           if getattr(plans[sug.change], f) != getattr(plan, f)}
                combined = replace(combined, **changed)
            try:
                est = self.estimate(combined)
                out.insert(0, Suggestion("all of: " + "; ".join(s.change for s in top), int(base.total - est.total),
                                         est.total, est.verdict))
            except Exception:  # noqa: BLE001
                pass
        base.notes = list(self.notes)
        return out


# ===================================================================================== refusal and OOM report
def check_fits(estimate: MemoryEstimate, override: bool = False) -> Optional[str]:
    """Raise :class:`TrainingError` when the estimate does not fit (estimate + SAFETY_MARGIN > available), unless
    ``override``. Returns a warning line for "tight" or overridden estimates, else None."""
    if estimate.verdict != "does not fit":
        if estimate.verdict == "tight":
            return (f"memory is tight: {estimate.summary()}; close other programs or lower the settings if it runs "
                    "out of memory")
        return None
    largest = sorted(estimate.breakdown.items(), key=lambda kv: -kv[1])[:4]
    parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in largest)
    tips = estimate.suggestions[:3]
    if tips:
        tip_text = " Try: " + "; ".join(f"{s.change} (saves {fmt_bytes(s.saves)}, {s.verdict})" for s in tips) + "."
    else:
        tip_text = " Lower the resolution, batch size or rank."
    if override:
        return (f"memory estimate says this will not fit ({estimate.summary()}); starting anyway because "
                "allow_over_memory is on")
    raise TrainingError(
        f"Not enough memory to train: the estimate is {fmt_bytes(estimate.total)} on {estimate.device} "
        f"(+{int(SAFETY_MARGIN * 100)} % safety) but only {fmt_bytes(estimate.available)} is available. Largest "
        f"parts: {parts}.{tip_text} To start anyway, turn on allow_over_memory (the estimate can be "
        "pessimistic; the run may then stop with out-of-memory, leaving a resumable state).")


def oom_report(estimate: Optional[MemoryEstimate], measured_peak: Optional[int], step: int) -> str:
    """A paragraph for the out-of-memory error: what the estimate said next to what happened."""
    peak = f"{fmt_bytes(measured_peak)}" if measured_peak else "unknown"
    if estimate is None:
        return (f"Out of memory at step {step} (peak {peak}); no memory estimate was made for this run. Lower the "
                "batch size, resolution or rank, turn on gradient checkpointing, or use an 8-bit optimizer.")
    head = (f"Out of memory at step {step}: the estimate was {fmt_bytes(estimate.total)} "
            f"({estimate.verdict}, {fmt_bytes(estimate.available)} available) and the peak reached {peak}.")
    if measured_peak and measured_peak < estimate.total * 0.9:
        why = (" The run failed below its estimate, so something else took memory (another model, a preview, "
               "another program); free it, or lower the settings.")
    elif measured_peak and measured_peak > estimate.total * 1.15:
        why = " The run used more than estimated; please report the settings with this message."
    else:
        why = ""
    tips = estimate.suggestions[:3]
    tip_text = (" Biggest savings: " + "; ".join(f"{s.change} (-{fmt_bytes(s.saves)})" for s in tips) + ".") \
        if tips else " Lower the batch size, resolution or rank, or turn on gradient checkpointing."
    return head + why + tip_text


def measured_peak(host) -> Optional[int]:
    """The device's peak since the last reset (peak RSS on the CPU), for :func:`oom_report`."""
    try:
        return int(host.memory().peak)
    except Exception:  # noqa: BLE001
        return None
