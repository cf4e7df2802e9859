"""The activation trace behind the memory estimate: adapter/optimizer counting, and a measurement of what autograd
saves on the loaded model at a few tiny sizes, fitted per module (the model is described in trainer/preflight/memory.py)."""
from __future__ import annotations

import contextlib
import math
import sys
import threading
import weakref
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

TRACE_SIDES = (8, 16, 24)  # latent sides of the trace forwards (multiples of 8 so every UNet level divides evenly)
FALLBACK_CHECKPOINT_RATIO = 0.27  # checkpointed / plain saved activations of the 81 M model at 512 px
_EIGHT_BIT_BLOCK = 256
OPTIMIZER_STATE = {  # bytes of optimizer state per trainable parameter (fallback when trainer.training.optim is absent)
    "adamw": 8.0,
    "adamw8bit": 2 * (1 + 4 / _EIGHT_BIT_BLOCK),
    "lion8bit": 1 + 4 / _EIGHT_BIT_BLOCK,
    "adafactor": 1.0,  # factored second moment of rank-r matrices: (r + d) fp32 per r*d params, ~4/r B/param
    "sgd": 4.0,  # momentum buffer (0 without momentum)
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
    """The rank trainer/adapters/network.py gives this target: conv_rank for non-1x1 convs when it is > 0, else rank."""
    if _is_conv_kxk(module) and network_cfg.conv_rank > 0:
        return int(network_cfg.conv_rank)
    return int(network_cfg.rank)


def target_dims(module) -> tuple[int, int]:
    """(fan in incl. kernel, fan out): a LoRA rank above min of both is meaningless (network.py refuses it)."""
    from torch import nn

    if isinstance(module, nn.Conv2d):
        return module.in_channels * math.prod(module.kernel_size), module.out_channels
    return module.in_features, module.out_features


def target_layout(module, rank: int, network_cfg=None):
    """The adapter trainer/adapters/network.py gives this target at ``rank`` under ``network_cfg``'s algorithm
    (plain LoRA without a config): its tensors' shapes, its rank limit (``Layout.fits()``)."""
    from torch import nn

    from ..adapters.algorithms import Geometry, layout

    if isinstance(module, nn.Conv2d):
        geometry = Geometry(module.out_channels, module.in_channels, tuple(module.kernel_size))
    else:
        geometry = Geometry(module.out_features, module.in_features)
    if network_cfg is None:
        return layout("lora", geometry, rank)
    return layout(network_cfg.algorithm, geometry, rank, lokr_factor=network_cfg.lokr_factor,
                  lokr_full_matrix=network_cfg.lokr_full_matrix)


def adapter_param_count(module, rank: int, network_cfg=None) -> int:
    """Adapter parameters for one target. LoRA: Linear rank*(in+out); Conv2d rank*in*kh*kw + out*rank (1x1 up
    conv); DoRA adds one magnitude per input channel; LoHa twice LoRA's; LoKr its two Kronecker factors
    (trainer/adapters/algorithms.py)."""
    return target_layout(module, rank, network_cfg).param_count()


def adapter_shapes(module, rank: int, network_cfg=None) -> list[tuple[int, ...]]:
    return list(target_layout(module, rank, network_cfg).shapes.values())


def optimizer_state_bytes(name: str, n_params: int, shapes: Optional[Sequence[tuple[int, ...]]] = None,
                          momentum: float = 0.9) -> int:
    """Optimizer state for ``n_params`` trainable parameters: trainer.training.optim's estimate when available, else ours.

    Ours, with ``shapes``: Adafactor keeps a row and a column vector per tensor of >= 2 dims (factored over the last
    two dims, as transformers' Adafactor does), fp32 per value for 1-dim ones; 8-bit optimizers keep fp32 state for
    tensors under 4096 values (bitsandbytes' min_8bit_size)."""
    if name == "sgd" and momentum == 0:
        return 0
    try:
        from ..training.optim import optimizer_state_bytes as from_optim

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
    """Temporary LoRA-shaped forward hooks that do what trainer/adapters/network.py's hooks do (fp32 adapters; the hook adds
    ``up(down(dropout(x.float()))) * scale`` cast to the output dtype), so autograd saves the same tensors. The
    ids of the rank-wide ``down`` outputs are recorded so their bytes can be rescaled for another rank.

    Other algorithms (``network_cfg.algorithm`` LoHa, LoKr, DoRA) are traced with the real adapter modules and the
    network's own hooks (trainer/adapters/network.py), so what they save (DoRA's scaled input, LoKr's grouped
    products, LoHa's input and factors) is measured, not modelled."""

    def __init__(self, targets: Sequence[Any], ranks: Sequence[int], dropout: float, network_cfg=None):
        self.targets, self.ranks, self.dropout = list(targets), list(ranks), float(dropout)
        self.network_cfg = network_cfg
        self.handles: list[Any] = []
        self.params: list[Any] = []
        self.down_outputs: set[int] = set()  # storage data_ptrs of down outputs in the current forward

    def _enter_real(self) -> None:
        """Real adapter modules of the configured algorithm on every target, hooked as the network hooks them."""
        import dataclasses

        import torch

        from ..adapters.network import LoRANetwork, make_adapter

        cfg = dataclasses.replace(self.network_cfg, dropout=self.dropout)
        for target, rank in zip(self.targets, self.ranks):
            module = target.module
            lay = target_layout(module, rank, cfg)
            if rank <= 0 or not lay.fits() or module.weight.device.type == "meta":
                continue  # network.py refuses these; preflight reports them
            with torch.inference_mode(False):
                adapter = make_adapter(module, lay, rank, cfg).to(module.weight.device).train()
            hooks = LoRANetwork.hooks_for(adapter)
            self.params += list(adapter.parameters()) + list(adapter.buffers())
            self.handles.append(module.register_forward_hook(hooks[0], with_kwargs=True))
            if hooks[1] is not None:
                self.handles.append(module.register_forward_pre_hook(hooks[1], with_kwargs=True))

    def __enter__(self) -> "_Adapters":
        import torch
        import torch.nn.functional as F
        from torch import nn

        if self.network_cfg is not None and self.network_cfg.algorithm != "lora":
            try:
                self._enter_real()
            except BaseException:
                self.__exit__(None, None, None)
                raise
            return self
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


def _text_shapes(host) -> tuple:
    """(tokens, width, pooled width or None, extras) of the host's text conditioning, from one encoded empty
    caption; extras: the entry's other tensors (``extra.*``: masks, HiDream's Llama states) for per-sample hosts."""
    try:
        item = host.encode_text([""], 1)[0]
        ctx = item["context"]
        pooled = item.get("pooled")
        extras = {k: v for k, v in item.items() if k.startswith("extra.")}
        return (int(ctx.shape[-2]), int(ctx.shape[-1]), (int(pooled.shape[-1]) if pooled is not None else None),
                extras)
    except Exception:  # noqa: BLE001 - no text encoder connected: the config width is enough for SD1.5
        pooled = getattr(host, "pooled_width", None) or (1280 if host.family == "sdxl" else None)
        return 77, int(getattr(host, "context_width", 768) or 768), pooled, {}


def _dummy_inputs(host, batch: int, side: int, text: tuple):
    import torch

    from ..hosts.base import Conditioning

    device, dtype = host.device, host.dtype
    tokens, width, pooled_width, extras = text
    frames = (1,) if getattr(host, "latent_dims", 2) == 3 else ()  # Wan / Qwen-Image: one-frame video latents
    noisy = torch.randn(batch, host.latent_channels, *frames, side, side, device=device, dtype=torch.float32)
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
    samples = None
    if getattr(host, "per_sample_conditioning", False):  # the entries a text cache would hand over
        samples = [{"context": context[i], **({"pooled": pooled[i]} if pooled is not None else {}),
                    **{k: v.to(device) for k, v in extras.items()}} for i in range(batch)]
    cond = Conditioning(context, pooled, size_ids, samples)
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


def _algorithm_key(network_cfg) -> tuple:
    if network_cfg is None:
        return ("lora",)
    return (network_cfg.algorithm, network_cfg.lokr_factor, bool(network_cfg.lokr_full_matrix))


def trace_denoiser(host, targets, ranks, *, mixed_precision: str = "no", dropout: float = 0.0,
                   attention: str = "sdpa", checkpointing: bool = True, network_cfg=None) -> ActivationFit:
    """Trace the denoiser's saved activations at the small sizes and fit them (cached per model and settings).
    The checkpointed traces run only when ``checkpointing`` asks for them. ``network_cfg``: the adapter algorithm
    to trace (None: LoRA)."""
    import torch

    denoiser = host.denoiser()
    key = (type(host).__qualname__, tuple((id(t.module), r) for t, r in zip(targets, ranks)), mixed_precision,
           dropout > 0, attention, str(host.dtype), _algorithm_key(network_cfg))
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

    with _grad_mode(), _Adapters(targets, ranks, dropout, network_cfg) as adapters, _attention_context(attention):
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
                        clip_skip: int = 1, network_cfg=None) -> tuple[float, float]:
    """(batch-independent, per-sample) saved bytes of a text-encoder forward with adapters (text-encoder training)."""
    forward = getattr(host, "text_forward", None)
    if forward is None or not targets:
        raise RuntimeError("the host has no text_forward")
    encoders = list(host.text_encoders().values())
    values = []
    with _grad_mode(), _Adapters(targets, ranks, dropout, network_cfg) as adapters:
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
