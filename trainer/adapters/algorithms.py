"""What each adapter algorithm stores for one layer: tensor names and shapes, the scale rule, the rank limit, and
which factors LoRA+ speeds up. Torch-free: the adapter modules build their parameters from these layouts, and the
memory estimate and pre-flight count and check the very same shapes.

Shapes follow the files kohya, LyCORIS and ComfyUI's LoraLoader read (``comfy/weight_adapter/``). For a layer with
``out`` outputs, ``in`` inputs and kernel ``k`` (``kk`` = kh * kw, 1 for a Linear):

* ``lora``  ``lora_down.weight`` (r, in, *k), ``lora_up.weight`` (out, r[, 1, 1]); scale alpha / r.
* ``dora``  LoRA plus ``dora_scale`` (1, in[, 1, 1]): the magnitude of every input column of the merged weight,
  the axis on which ComfyUI re-normalises the merged weight (see trainer/adapters/dora.py for why not the output).
* ``loha``  ``hada_w1_a`` / ``hada_w2_a`` (out, r), ``hada_w1_b`` / ``hada_w2_b`` (r, in * kk);
  delta = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r.
* ``lokr``  ``out = out_l * out_k`` and ``in = in_m * in_n`` split by :func:`kron_split`; ``lokr_w1`` (out_l, in_m)
  is always full rank (the small side); the large side is ``lokr_w2_a`` (out_k, r) @ ``lokr_w2_b`` (r, in_n * kk)
  with scale alpha / r, or, with ``full_matrix``, one ``lokr_w2`` (out_k, in_n[, *k]) with scale 1 (readers ignore
  alpha when no factor has an ``_a``/``_b`` pair). delta = kron(w1, w2) * scale.

Every layout also stores ``alpha`` (a 0-dim fp32 tensor).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

from ..choices import ALGORITHMS

LYCORIS_MODULE = "lycoris.kohya"  # ss_network_module of LyCORIS files (LoHa, LoKr, DoRA) in kohya's metadata
KOHYA_MODULE = "networks.lora"  # ss_network_module of kohya's own LoRA / LoCon
LYCORIS_ALGO = {"dora": "lora", "loha": "loha", "lokr": "lokr"}  # LyCORIS calls DoRA "lora with dora_wd"
# The tensor suffix that identifies each algorithm in a file (checked in this order: DoRA is LoRA + dora_scale).
SIGNATURE = (("dora", "dora_scale"), ("loha", "hada_w1_a"), ("lokr", "lokr_w1"), ("lora", "lora_up.weight"))
NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}


@dataclass(frozen=True)
class Geometry:
    """The shape of a target layer: ``kernel`` is () for a Linear, (kh, kw) for a Conv2d."""

    out: int
    inp: int
    kernel: tuple[int, ...] = ()

    @property
    def kk(self) -> int:
        return math.prod(self.kernel) if self.kernel else 1

    @property
    def fan_in(self) -> int:
        return self.inp * self.kk

    @property
    def is_conv(self) -> bool:
        return bool(self.kernel)


@dataclass(frozen=True)
class Layout:
    """The tensors of one adapter (suffix -> shape, ``alpha`` excluded) and how they are used."""

    algorithm: str
    rank: int  # the low-rank width (LoKr full matrix: 0, no low-rank factor)
    shapes: Mapping[str, tuple[int, ...]]
    plus: tuple[str, ...]  # factors that get learning_rate x loraplus_lr_ratio (LoRA's up/B role)
    split: Optional[tuple[tuple[int, int], tuple[int, int]]] = None  # LoKr: ((out_l, out_k), (in_m, in_n))
    limit: Optional[int] = None  # the largest rank that means anything for this layer
    limit_reason: str = ""

    @property
    def full_matrix(self) -> bool:
        return self.algorithm == "lokr" and "lokr_w2" in self.shapes

    def param_count(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def scale(self, alpha: float) -> float:
        """The factor readers apply to the product: alpha / rank (kohya: alpha 0 means alpha = rank), except LoKr
        without a low-rank factor, which readers apply unscaled."""
        if self.full_matrix:
            return 1.0
        return (float(alpha) if alpha else float(self.rank)) / self.rank

    def fits(self) -> bool:
        return self.limit is None or self.rank <= self.limit


def kron_split(dim: int, factor: int = -1) -> tuple[int, int]:
    """``dim = small * large`` with small <= large, as LyCORIS factorises for LoKr: a ``factor`` that divides ``dim``
    gives (factor, dim / factor) (ordered); otherwise the most balanced split whose small side is at most
    ``factor`` (-1: no bound). 1024 -> (32, 32); factor 8: (8, 128); 127 (prime) -> (1, 127)."""
    if dim < 1:
        raise ValueError(f"cannot split dimension {dim}")
    if factor > 0 and dim % factor == 0:
        return min(factor, dim // factor), max(factor, dim // factor)
    bound = dim if factor <= 0 else factor
    small = max(m for m in range(1, math.isqrt(dim) + 1) if dim % m == 0 and m <= bound)
    return small, dim // small


def layout(algorithm: str, geometry: Geometry, rank: int, *, lokr_factor: int = -1, lokr_full_matrix: bool = False,
           lokr_split: Optional[tuple[tuple[int, int], tuple[int, int]]] = None) -> Layout:
    """The adapter one layer gets. ``lokr_split`` forces LoKr's split (a file's own), else ``lokr_factor`` sets it."""
    g, k = geometry, geometry.kernel
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown adapter algorithm '{algorithm}' (choose one of: {', '.join(ALGORITHMS)})")
    limit = min(g.fan_in, g.out)
    reason = f"in {g.fan_in}, out {g.out}"
    if algorithm in ("lora", "dora"):
        shapes = {"lora_down.weight": (rank, g.inp, *k), "lora_up.weight": (g.out, rank, *((1, 1) if k else ()))}
        if algorithm == "dora":
            shapes["dora_scale"] = (1, g.inp, *((1, 1) if k else ()))
        return Layout(algorithm, rank, shapes, ("lora_up.weight",), limit=limit, limit_reason=reason)
    if algorithm == "loha":
        shapes = {"hada_w1_a": (g.out, rank), "hada_w1_b": (rank, g.fan_in),
                  "hada_w2_a": (g.out, rank), "hada_w2_b": (rank, g.fan_in)}
        return Layout(algorithm, rank, shapes, ("hada_w1_a", "hada_w2_a"), limit=limit, limit_reason=reason)
    (out_l, out_k), (in_m, in_n) = lokr_split or (kron_split(g.out, lokr_factor), kron_split(g.inp, lokr_factor))
    shapes = {"lokr_w1": (out_l, in_m)}
    if lokr_full_matrix:
        shapes["lokr_w2"] = (out_k, in_n, *k)
        return Layout(algorithm, 0, shapes, (), split=((out_l, out_k), (in_m, in_n)))
    shapes.update({"lokr_w2_a": (out_k, rank), "lokr_w2_b": (rank, in_n * g.kk)})
    return Layout(algorithm, rank, shapes, ("lokr_w2_a",), split=((out_l, out_k), (in_m, in_n)),
                  limit=min(out_k, in_n * g.kk),
                  limit_reason=f"its larger Kronecker factor is {out_k} x {in_n * g.kk}")


def layout_of_file(algorithm: str, geometry: Geometry, tensors: Mapping[str, tuple[int, ...]]) -> Layout:
    """The layout a file's tensors (suffix -> shape) describe for this layer, to rebuild an adapter of another rank
    (or another LoKr split) than configured. Raises ValueError when a tensor the algorithm needs is missing."""
    def need(name):
        if name not in tensors:
            raise ValueError(f"no '{name}' tensor")
        return tuple(tensors[name])

    if algorithm in ("lora", "dora"):
        return layout(algorithm, geometry, need("lora_down.weight")[0])
    if algorithm == "loha":
        return layout(algorithm, geometry, need("hada_w1_b")[0])
    out_l, in_m = need("lokr_w1")[:2]
    if not (out_l and in_m and geometry.out % out_l == 0 and geometry.inp % in_m == 0):
        raise ValueError(f"lokr_w1 {(out_l, in_m)} does not divide the layer ({geometry.out} x {geometry.inp})")
    split = ((out_l, geometry.out // out_l), (in_m, geometry.inp // in_m))
    if "lokr_w2" in tensors:
        return layout(algorithm, geometry, 0, lokr_full_matrix=True, lokr_split=split)
    return layout(algorithm, geometry, need("lokr_w2_b")[0], lokr_split=split)


def algorithm_of(suffixes) -> Optional[str]:
    """The algorithm a file's tensor suffixes (e.g. ``{"hada_w1_a", "alpha", ...}``) belong to, or None."""
    suffixes = set(suffixes)
    for algorithm, suffix in SIGNATURE:
        if suffix in suffixes:
            return algorithm
    return None


def network_module(algorithm: str) -> str:
    """kohya's ``ss_network_module`` for files of ``algorithm``."""
    return KOHYA_MODULE if algorithm == "lora" else LYCORIS_MODULE


def network_args(algorithm: str, lokr_factor: int = -1, lokr_full_matrix: bool = False) -> dict[str, str]:
    """The ``ss_network_args`` entries that name the algorithm the way LyCORIS's kohya module reads them."""
    if algorithm == "lora":
        return {}
    args = {"algo": LYCORIS_ALGO[algorithm]}
    if algorithm == "dora":
        args.update({"dora_wd": "True", "wd_on_output": "False"})
    if algorithm == "lokr":
        args["factor"] = str(lokr_factor)
        if lokr_full_matrix:
            args["full_matrix"] = "True"
    return args
