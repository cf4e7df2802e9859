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
  trainer/adapters/network.py does). Other algorithms count their own tensors (trainer/adapters/algorithms.py):
  DoRA one magnitude per input channel more, LoHa twice LoRA's, LoKr its two Kronecker factors. Gradients: the
  same again (fp32). EMA: the same again when ``ema_decay > 0``. What an algorithm keeps for backward beyond that
  (DoRA: its input scaled per channel, next to LoRA's own input; it never builds the re-normalised weight, see
  trainer/adapters/dora.py) is in the traced activations: the trace runs the real adapter modules and hooks.
* optimizer state: ``trainer.training.optim.optimizer_state_bytes`` when it is importable, else :data:`OPTIMIZER_STATE`
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
wide), rank 16 "transformer" targets, AdamW, steps of ``trainer.training.loop.train`` or an equivalent forward/backward/AdamW:

* live tensor memory, measured as the peak-RSS rise of a step run with ``MALLOC_MMAP_THRESHOLD_=16384`` (every
  allocation its own mapping, unmapped on free, so RSS follows live bytes), against the traced saved bytes:
  256 px b1 146 MB measured / 152 MB traced; 512 px b1 581 / 577; 512 px b2 1162 / 1154 -> ACTIVATION_PEAK_FACTOR
  = 1.0. The whole engine step needs 100-140 MiB more than the counted tensors regardless of size and batch
  (bench rows under that allocator: 512 px b1, 512 px b2 checkpointed, 512 px b2 bf16) -> CPU_STEP_OVERHEAD.
* with the default glibc allocator the process's peak RSS is higher again: freed activation blocks stay in the
  heap. That excess tracks the step's *un-checkpointed* saved activations (a checkpointed step recomputes them in
  the backward pass, so it allocates and frees the same blocks): 0.44-0.61x over the five bench rows (bf16 lowest;
  re-measured after the training step became its own function, which frees each micro-batch's tensors before the
  next one: the older loop kept them and measured 0.54-0.97x) -> CPU_HEAP_SLACK = 0.6. With these constants every
  bench row is within 10 % (see bench/memory.py).
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

import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

from ..adapters.algorithms import NAMES as ALGORITHM_NAMES
from ..errors import TrainingError
from .naming import CONFIG_KEYS, Naming, setting_ref
from .activation_trace import (  # noqa: F401 - re-exported: part of this module's API
    FALLBACK_CHECKPOINT_RATIO,
    OPTIMIZER_STATE,
    TRACE_SIDES,
    ActivationFit,
    _release_heap,
    adapter_param_count,
    adapter_shapes,
    target_layout,
    module_bytes,
    optimizer_state_bytes,
    target_dims,
    target_rank,
    trace_denoiser,
    trace_text_encoders,
)

GIB = 1024 ** 3
MIB = 1024 ** 2

# --- verdict margins ---------------------------------------------------------------------------------------------
SAFETY_MARGIN = 0.10  # the estimate plus 10 % must fit in what is available, or the run is refused
TIGHT_MARGIN = 0.25  # below 25 % headroom the verdict is "tight": it should fit, but little else may run

# --- calibration constants (see the module docstring) ------------------------------------------------------------
ACTIVATION_PEAK_FACTOR = 1.0  # peak live activation memory / traced saved bytes (measured 0.95 - 1.01)
CPU_STEP_OVERHEAD = 128 * MIB  # live memory a CPU step needs beyond the counted tensors (measured 100-140 MiB)
CPU_HEAP_SLACK = 0.6  # glibc heap kept on top of that, x the step's un-checkpointed saved activations (fitted)
CUDA_CONTEXT_BYTES = 512 * MIB  # CUDA context + cuBLAS/cuDNN handles (typical 350-600 MiB with lazy module loading)
CUDA_ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation on top of live tensors, x activations (not measured)
FALLBACK_BYTES_PER_PIXEL_PER_SQRT_PARAM = 3.83  # x element size: 138 kB/latent pixel at 81.5 M params in fp32

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
    by_batch: dict[int, tuple[int, str]] = field(default_factory=dict)  # batch size -> (total, verdict)

    @property
    def largest_fitting_batch(self) -> Optional[int]:
        """The largest batch size of ``by_batch`` that is not refused (None: none fits, or no table)."""
        ok = [b for b, (_, verdict) in self.by_batch.items() if verdict != "does not fit"]
        return max(ok) if ok else None

    @property
    def tensor_total(self) -> int:
        """What torch allocates for tensors (compare with torch.cuda.max_memory_allocated)."""
        return self.total - self.framework

    @property
    def comparable_peak(self) -> int:
        """The figure to compare with the host's reported peak: tensors on a GPU (max_memory_allocated), the whole
        process on the CPU (peak RSS)."""
        return self.tensor_total if self.device.startswith("cuda") else self.total

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
        if self.by_batch:
            table = ", ".join(f"{b}: {fmt_bytes(t)} ({v})" for b, (t, v) in sorted(self.by_batch.items()))
            best = self.largest_fitting_batch
            lines.append(f"  by batch size: {table}; largest that fits: {best if best else 'none'}")
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
            "by_batch": [{"batch_size": b, "total": int(t), "verdict": v} for b, (t, v) in sorted(self.by_batch.items())],
        }


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
    from ..config import BucketConfig

    if buckets is None:
        buckets = BucketConfig()
    if isinstance(buckets, int):
        return buckets, buckets
    if isinstance(buckets, BucketConfig):
        sizes: list[tuple[int, int]] = []
        try:
            from ..data.buckets import make_buckets

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


def _autocast_of(cfg, host) -> str:
    """The autocast the run will use ("bf16", "fp16" or "no"): what the trace must run under."""
    from ..training.precision import resolve_precision

    return resolve_precision(cfg.mixed_precision, host.dtype, host.device).autocast_name


def estimate_training_memory(host, cfg, buckets=None, batch_size: Optional[int] = None, *,
                             resident_encoders: bool, attention: str = "sdpa",
                             suggest: bool = True, batch_table: Sequence[int] = (),
                             naming: Optional[Naming] = None) -> "MemoryEstimate":
    """Estimate the peak memory of training ``cfg`` on ``host``'s loaded model at the largest of ``buckets``.

    ``buckets``: a :class:`~trainer.config.BucketConfig` (its buckets are generated), or the list of (width, height)
    buckets the cached latents actually use. ``batch_size`` defaults to ``cfg.batch_size``. ``resident_encoders``:
    the text encoders and VAE stay in device memory during training (else the host offloads them; they are always
    counted when the text encoder is trained). ``attention``: "sdpa" / "flash" / "xformers" trace the host's own
    attention; "math" forces PyTorch's math SDPA kernel (keeps the tokens x tokens probabilities).
    ``batch_table``: batch sizes to estimate as well (``MemoryEstimate.by_batch``), from the same trace.
    ``naming``: the words the suggestions use for settings (``naming.py``; config keys by default)."""
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention = {attention!r}; choose one of: {', '.join(ATTENTION_KINDS)}")
    batch = int(batch_size if batch_size is not None else cfg.batch_size)
    width, height = _largest_bucket(buckets)
    plan = _Plan(rank_scale=1.0, batch=max(1, batch), pixels=(width / 8) * (height / 8), bucket=(width, height),
                 checkpointing=bool(cfg.gradient_checkpointing), mixed_precision=_autocast_of(cfg, host),
                 optimizer=cfg.optimizer.name, fp8_weights=False, resident_encoders=bool(resident_encoders),
                 train_text_encoder=bool(cfg.network.train_text_encoder))
    ctx = _Context(host, cfg, attention)
    try:
        base = ctx.estimate(plan)
        if suggest:
            base.suggestions = ctx.suggestions(plan, base, naming or CONFIG_KEYS)
        for b in sorted({int(b) for b in batch_table if int(b) >= 1}):
            est = base if b == plan.batch else ctx.estimate(replace(plan, batch=b))
            base.by_batch[b] = (est.total, est.verdict)
    finally:
        if ctx.is_cpu:
            _release_heap()
    return base


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
        targets = list(host.adapter_targets(net.targets, net.conv_rank > 0, net.train_text_encoder))
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
            lay = target_layout(t.module, r, self.cfg.network)  # the algorithm's own tensors (DoRA: + magnitudes)
            if not lay.fits():
                continue
            n += lay.param_count()
            shapes += list(lay.shapes.values())
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
                    checkpointing=checkpointing, network_cfg=self.cfg.network)
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
                    clip_skip=self.cfg.clip_skip, network_cfg=self.cfg.network)
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
        breakdown[f"{ALGORITHM_NAMES.get(cfg.network.algorithm, 'LoRA')} adapters (fp32)"] = 4 * n_adapter
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
            "conv_rank": cfg.network.conv_rank, "targets": cfg.network.targets, "adapter_params": n_adapter,
            "algorithm": cfg.network.algorithm,
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
    def suggestions(self, plan: _Plan, base: MemoryEstimate, naming: Naming) -> list[Suggestion]:
        """What to change, each re-estimated, biggest saving first; each names its settings in ``naming``'s words
        and is offered only where it can work (8-bit optimizers and fp8 weights need CUDA)."""
        cfg = self.cfg
        ref = setting_ref
        variants: list[tuple[str, _Plan]] = []
        rank = cfg.network.rank
        if rank >= 2:
            new_rank = max(1, rank // 2)
            conv = f" and {ref('network.conv_rank')} {cfg.network.conv_rank} -> {max(1, cfg.network.conv_rank // 2)}" \
                if cfg.network.conv_rank > 1 else ""
            variants.append((f"lower {ref('network.rank')} {rank} -> {new_rank}{conv}",
                             replace(plan, rank_scale=new_rank / rank)))
        if plan.batch > 1:
            new_batch = plan.batch // 2
            accum = cfg.optimizer.grad_accumulation * (plan.batch // new_batch)
            variants.append((f"lower {ref('batch_size')} {plan.batch} -> {new_batch} (set "
                             f"{ref('optimizer.grad_accumulation')} to {accum} to keep the effective batch)",
                             replace(plan, batch=new_batch)))
        w, h = plan.bucket
        res = int(round(math.sqrt(w * h) / 64)) * 64
        new_res = int(res * 0.75) // 64 * 64
        if new_res >= 256:
            scale = new_res / res
            nw, nh = max(8, int(round(w * scale / 8)) * 8), max(8, int(round(h * scale / 8)) * 8)
            variants.append((f"lower the training resolution ({ref('buckets.resolutions')}) {res} -> {new_res}",
                             replace(plan, bucket=(nw, nh), pixels=(nw / 8) * (nh / 8))))
        if not plan.checkpointing:
            variants.append((f"turn on {ref('gradient_checkpointing')} (about 20-40 % slower steps)",
                             replace(plan, checkpointing=True)))
        if plan.optimizer in ("adamw",) and self.is_cuda:  # bitsandbytes' 8-bit optimizers are made for CUDA
            variants.append((f"use an 8-bit optimizer: {ref('optimizer.name')} adamw8bit (needs bitsandbytes)",
                             replace(plan, optimizer="adamw8bit")))
        if plan.mixed_precision == "no" and self.weight_elem >= 4:
            variants.append((f"set {ref('mixed_precision')} to bf16", replace(plan, mixed_precision="bf16")))
        if self.is_cuda and self.weight_elem >= 2 and not plan.fp8_weights:
            variants.append(("load the model with fp8 weights: ComfyUI's Load Diffusion Model node, weight_dtype "
                             "fp8_e4m3fn (the model is already loaded, so this is a loader option; slower steps)",
                             replace(plan, fp8_weights=True)))
        if plan.resident_encoders and not plan.train_text_encoder and not self.is_cpu:
            variants.append(("let the text encoders and VAE leave device memory during training (cache the text "
                             "embeddings first)", replace(plan, resident_encoders=False)))
        if plan.train_text_encoder:
            variants.append((f"turn off {ref('network.train_text_encoder')}", replace(plan, train_text_encoder=False)))
        out, plans = [], {}
        for change, variant in variants:
            try:
                est = self.estimate(variant)
            except Exception:  # noqa: BLE001 - a variant that cannot be estimated is simply not suggested
                continue
            saves = base.total - est.total
            if saves >= 1 * MIB:
                change = naming.text(change)
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
def check_fits(estimate: MemoryEstimate, override: bool = False, naming: Naming = CONFIG_KEYS) -> Optional[str]:
    """Raise :class:`TrainingError` when the estimate does not fit (estimate + SAFETY_MARGIN > available), unless
    ``override``. Returns a warning line for "tight" or overridden estimates, else None. ``naming``: the words for
    the override setting (``naming.py``)."""
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
                f"{naming('allow_over_memory')} is on")
    raise TrainingError(
        f"Not enough memory to train: the estimate is {fmt_bytes(estimate.total)} on {estimate.device} "
        f"(+{int(SAFETY_MARGIN * 100)} % safety) but only {fmt_bytes(estimate.available)} is available. Largest "
        f"parts: {parts}.{tip_text} To start anyway, turn on {naming('allow_over_memory')} (the estimate can be "
        "pessimistic; the run may then stop with out-of-memory, leaving a resumable state).")


def oom_report(estimate: Optional[MemoryEstimate], measured_peak: Optional[int], step: int) -> str:
    """A paragraph for the out-of-memory error: what the estimate said next to what happened."""
    peak = f"{fmt_bytes(measured_peak)}" if measured_peak else "unknown"
    if estimate is None:
        return (f"Out of memory at step {step} (peak {peak}); no memory estimate was made for this run. Lower the "
                "batch size, resolution or rank, turn on gradient checkpointing, or use an 8-bit optimizer.")
    expected = estimate.comparable_peak  # what the reported peak measures (tensors on a GPU, the process on a CPU)
    head = (f"Out of memory at step {step}: the estimate was {fmt_bytes(estimate.total)} "
            f"({estimate.verdict}, {fmt_bytes(estimate.available)} available) and the peak reached {peak}"
            + (f" (estimated {fmt_bytes(expected)} of tensors)." if expected != estimate.total else "."))
    if measured_peak and measured_peak < expected * 0.9:
        why = (" The run failed below its estimate, so something else took memory (another model, a preview, "
               "another program); free it, or lower the settings.")
    elif measured_peak and measured_peak > expected * 1.15:
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
