"""The adapter network: kohya/LyCORIS-compatible adapters attached to the host model with forward hooks.

Nothing in the host model is replaced or re-parented: :meth:`LoRANetwork.attach` registers one forward hook per
target module that adds the adapter's effect to the module's output (DoRA, which scales the module's input
channels, adds a forward pre-hook too), and :meth:`LoRANetwork.detach` removes exactly those hooks. The targets are
kept in a plain dict, so they are not submodules of the network: ``network.parameters()`` / ``state_dict()`` hold
the adapters only, and ``network.to(device)`` never moves the base model.

Hooks rather than ComfyUI's own adapter classes (``comfy/weight_adapter``): the engine never imports ComfyUI and
runs the same code on the diffusers host; ComfyUI's training adapters rebuild each full weight per forward (a
weight-sized product and copy per layer, LoRA included), while hooks keep LoRA, LoKr and DoRA at rank-sized cost.
ComfyUI reads the files we write with those classes, which is what the tests compare against.

The algorithm (``network.algorithm``: lora, loha, lokr, dora; trainer/adapters/algorithms.py) decides each
adapter's tensors. Adapters are fp32 by default whatever dtype the host runs in. ``kohya_state_dict()`` keys are
the file's keys (``<name>.lora_down.weight``, ``<name>.hada_w1_a``, ``<name>.lokr_w1``, ``<name>.dora_scale``,
``<name>.alpha``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from ..choices import ALGORITHMS
from ..config import NetworkConfig
from ..errors import ConfigError, TrainingError
from ..hosts.base import AdapterTarget
from .algorithms import NAMES, Layout, algorithm_of, layout, layout_of_file
from .dora import DoRAModule
from .loha import LoHaModule
from .lokr import LoKrModule
from .lora import AdapterModule, LoRAModule, geometry_of

__all__ = ["LoRANetwork", "LoRAModule", "AdapterModule", "LoadReport", "MODULES", "adapter_layout", "make_adapter"]

COMPONENT_ORDER = ("unet", "te", "te1", "te2")
MODULES: dict[str, type[AdapterModule]] = {"lora": LoRAModule, "dora": DoRAModule, "loha": LoHaModule,
                                           "lokr": LoKrModule}
KNOWN_SUFFIXES = {"alpha", "lora_down.weight", "lora_up.weight", "dora_scale", "hada_w1_a", "hada_w1_b",
                  "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}


def check_network_config(cfg: NetworkConfig) -> None:
    """The algorithm settings the network cannot work without (pre-flight reports them all at once first)."""
    if cfg.algorithm not in ALGORITHMS:
        raise ConfigError(f"network.algorithm = {cfg.algorithm!r} is not known; choose one of: {', '.join(ALGORITHMS)}")
    if cfg.algorithm == "lokr" and (not isinstance(cfg.lokr_factor, int) or isinstance(cfg.lokr_factor, bool)
                                    or not (cfg.lokr_factor == -1 or cfg.lokr_factor >= 1)):
        raise ConfigError(f"network.lokr_factor = {cfg.lokr_factor!r} must be -1 (the most balanced split) or a "
                          "whole number >= 1 (8 or 16 is usual)")


def rank_alpha(module: nn.Module, cfg: NetworkConfig) -> tuple[int, float, str]:
    """(rank, alpha, the setting they come from): 3x3 convs get conv_rank / conv_alpha when conv_rank > 0."""
    from .targets import is_conv3x3

    if is_conv3x3(module) and cfg.conv_rank > 0:
        return int(cfg.conv_rank), float(cfg.conv_alpha), "network.conv_rank"
    return int(cfg.rank), float(cfg.alpha), "network.rank"


def adapter_layout(module: nn.Module, cfg: NetworkConfig, rank: Optional[int] = None) -> Layout:
    """The layout ``cfg`` gives this target (at ``rank`` instead of the configured one, when given)."""
    configured, _, _ = rank_alpha(module, cfg)
    return layout(cfg.algorithm, geometry_of(module), configured if rank is None else rank,
                  lokr_factor=cfg.lokr_factor, lokr_full_matrix=cfg.lokr_full_matrix)


def make_adapter(target: nn.Module, lay: Layout, alpha: float, cfg: NetworkConfig, multiplier: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> AdapterModule:
    """One adapter module of ``lay.algorithm`` for ``target`` (built on the CPU)."""
    return MODULES[lay.algorithm](target, lay, alpha, cfg.dropout, multiplier, generator)


@dataclass
class LoadReport:
    """What :meth:`LoRANetwork.load_kohya_state_dict` did."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # adapters of the network that the file lacks (left as init)
    unexpected: list[str] = field(default_factory=list)  # keys of the file that match no adapter (ignored)
    rebuilt: list[tuple[str, int, int]] = field(default_factory=list)  # (name, config rank, file rank)


def _weight_device(module: nn.Module) -> torch.device:
    weight = getattr(module, "weight", None)
    if weight is None or weight.device.type == "meta":
        return torch.device("cpu")
    return weight.device


def _first_input(args, kwargs):
    return args[0] if args else (kwargs["input"] if "input" in kwargs else next(iter(kwargs.values())))


def _post_hook(get_adapter):
    """The forward hook: the target's output with the adapter's effect added (``get_adapter`` is called per call,
    so an adapter rebuilt by a load is picked up)."""
    def hook(_module, args, kwargs, output):
        adapter = get_adapter()
        if adapter.multiplier == 0:
            return output
        return adapter.hook_post(_first_input(args, kwargs), output)

    return hook


def _pre_hook(get_adapter):
    """The forward pre-hook of adapters that change their target's input (DoRA)."""
    def pre_hook(_module, args, kwargs):
        adapter = get_adapter()
        if adapter.multiplier == 0:
            return None
        if args:
            return (adapter.hook_pre(args[0]), *args[1:]), kwargs
        key = "input" if "input" in kwargs else next(iter(kwargs))
        return args, {**kwargs, key: adapter.hook_pre(kwargs[key])}

    return pre_hook


class LoRANetwork(nn.Module):
    """Adapters of ``config.algorithm`` for a list of :class:`AdapterTarget`, ranks from :class:`NetworkConfig`.

    Linear and 1x1 conv targets get ``rank``/``alpha``; 3x3 (any non-1x1) conv targets get ``conv_rank``/
    ``conv_alpha``, or ``rank``/``alpha`` when ``conv_rank`` is 0. A rank larger than a layer allows (LoRA, LoHa,
    DoRA: min(in, out); LoKr: the size of its large Kronecker factor) is an error naming the setting and the layer.
    """

    def __init__(self, targets: Sequence[AdapterTarget], config: Optional[NetworkConfig] = None, *,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                 generator: Optional[torch.Generator] = None, multiplier: float = 1.0):
        super().__init__()
        with torch.inference_mode(False):  # ComfyUI runs nodes under inference_mode: keep parameters trainable
            self._build(targets, config, dtype, device, generator, multiplier)

    def _build(self, targets, config, dtype, device, generator, multiplier) -> None:
        self.config = config or NetworkConfig()
        check_network_config(self.config)
        self.algorithm = self.config.algorithm
        if not targets:
            raise ConfigError(f"no modules to train for network.targets='{self.config.targets}': the model has none "
                              "of the layers these targets adapt")
        self._targets: dict[str, nn.Module] = {}  # a plain dict: the base model is never a submodule of ours
        self._components: dict[str, str] = {}
        self._handles: dict[str, list[torch.utils.hooks.RemovableHandle]] = {}
        self._optimizer_built = False
        self._dtype, self._device, self._multiplier = dtype, device, multiplier
        too_big = []
        for t in targets:
            if t.name in self._targets:
                raise ValueError(f"duplicate adapter name {t.name}")
            rank, alpha, setting = rank_alpha(t.module, self.config)
            if rank < 1:
                raise ConfigError(f"{setting} must be at least 1 (got {rank})")
            lay = adapter_layout(t.module, self.config)
            if not lay.fits():
                too_big.append((t.name, rank, setting, lay))
                continue
            self._targets[t.name] = t.module
            self._components[t.name] = t.component
            self.add_module(t.name, self._new_module(t.module, lay, alpha, generator))
        if too_big:
            name, rank, setting, lay = too_big[0]
            more = f" (and {len(too_big) - 1} more layers)" if len(too_big) > 1 else ""
            other = " or turn on network.lokr_full_matrix" if self.algorithm == "lokr" else ""
            raise ConfigError(f"{setting}={rank} is larger than layer {name} allows for {NAMES[self.algorithm]} "
                              f"({lay.limit_reason}: at most {lay.limit}){more}. Lower {setting} to {lay.limit} or "
                              f"less{other}")

    def _new_module(self, target: nn.Module, lay: Layout, alpha: float,
                    generator: Optional[torch.Generator] = None) -> AdapterModule:
        adapter = make_adapter(target, lay, alpha, self.config, self._multiplier, generator)  # built on the CPU
        return adapter.to(device=self._device or _weight_device(target), dtype=self._dtype)

    def _apply(self, fn, recurse=True):
        with torch.inference_mode(False):  # .to()/.cuda() under inference_mode would make inference tensors
            return super()._apply(fn, recurse)

    # --- access ---------------------------------------------------------------------------------------------------
    def lora_modules(self) -> dict[str, AdapterModule]:
        return {name: self._modules[name] for name in self._targets}

    def __getitem__(self, name: str) -> AdapterModule:
        return self._modules[name]

    def __len__(self) -> int:
        return len(self._targets)

    def __repr__(self) -> str:
        counts = {c: list(self._components.values()).count(c) for c in COMPONENT_ORDER if c in self._components.values()}
        return (f"LoRANetwork({NAMES[self.algorithm]}, {len(self)} adapters {counts}, rank {self.config.rank}, "
                f"alpha {self.config.alpha})")

    def target(self, name: str) -> nn.Module:
        return self._targets[name]

    def component(self, name: str) -> str:
        return self._components[name]

    def set_multiplier(self, multiplier: float) -> None:
        self._multiplier = multiplier
        for lora in self.lora_modules().values():
            lora.multiplier = multiplier

    # --- attach / detach ------------------------------------------------------------------------------------------
    @property
    def is_attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "LoRANetwork":
        """Hook every adapter onto its target. Idempotent."""
        for name, target in self._targets.items():
            if name in self._handles:
                continue
            handles = [target.register_forward_hook(self._make_hook(name), with_kwargs=True)]
            if self._modules[name].uses_pre_hook:
                handles.append(target.register_forward_pre_hook(self._make_pre_hook(name), with_kwargs=True))
            self._handles[name] = handles
        return self

    def detach(self) -> None:
        """Remove exactly the hooks :meth:`attach` added. Idempotent; the host is then as it was before."""
        while self._handles:
            name, handles = self._handles.popitem()
            for handle in handles:
                handle.remove()
            self._modules[name].release()

    def _make_hook(self, name: str):
        modules = self._modules  # looked up per call, so a module rebuilt by a load is picked up
        return _post_hook(lambda: modules[name])

    def _make_pre_hook(self, name: str):
        modules = self._modules
        return _pre_hook(lambda: modules[name])

    @staticmethod
    def hooks_for(adapter: AdapterModule):
        """(forward hook, forward pre-hook or None) that apply ``adapter`` as the network does (with_kwargs=True);
        the memory trace hooks real adapters with these."""
        return _post_hook(lambda: adapter), (_pre_hook(lambda: adapter) if adapter.uses_pre_hook else None)

    @contextlib.contextmanager
    def attached(self) -> Iterator["LoRANetwork"]:
        """``with network.attached():`` hooks on inside, removed on exit even after an exception."""
        was_attached = self.is_attached
        self.attach()
        try:
            yield self
        finally:
            if not was_attached:
                self.detach()

    def __enter__(self) -> "LoRANetwork":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # --- optimisation ---------------------------------------------------------------------------------------------
    def param_groups(self, unet_lr: float, te_lr: Optional[float] = None, loraplus_ratio: float = 0.0) -> list[dict]:
        """One optimizer group per component ("unet", "te", "te1", "te2"), each with its LR (te_lr None -> unet_lr).

        A component whose LR is 0 is frozen (requires_grad False) and left out, as kohya does. With
        ``loraplus_ratio`` > 0 (LoRA+), each component's up/B factors (``Layout.plus``: lora_up; LoHa's hada_w1_a
        and hada_w2_a; LoKr's lokr_w2_a) form a second group "<component>_plus" at LR x ratio.
        """
        te_lr = unet_lr if te_lr is None else te_lr
        groups = []
        for component in COMPONENT_ORDER:
            adapters = [a for name, a in self.lora_modules().items() if self._components[name] == component]
            if not adapters:
                continue
            lr = unet_lr if component == "unet" else te_lr
            params = [p for a in adapters for p in a.parameters()]
            if lr == 0:
                for p in params:
                    p.requires_grad_(False)
                continue
            plus = {id(p) for a in adapters for p in a.plus_parameters()} if loraplus_ratio > 0 else set()
            base = [p for p in params if id(p) not in plus]
            if base:
                groups.append({"params": base, "lr": lr, "name": component})
            if plus:
                groups.append({"params": [p for p in params if id(p) in plus], "lr": lr * loraplus_ratio,
                               "name": f"{component}_plus"})
        self._optimizer_built = True
        return groups

    # --- the file's tensors ---------------------------------------------------------------------------------------
    def kohya_state_dict(self, dtype: torch.dtype = torch.float32, device="cpu") -> dict[str, torch.Tensor]:
        """Copies of the adapter tensors under the file's keys; alpha stays an fp32 0-dim tensor (exact)."""
        out = {}
        for name, adapter in self.lora_modules().items():
            for suffix, tensor in adapter.named_tensors().items():
                out[f"{name}.{suffix}"] = tensor.detach().to(device, dtype, copy=True)
            out[f"{name}.alpha"] = adapter.alpha.detach().to(device, torch.float32, copy=True).reshape(())
        return out

    def load_kohya_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> LoadReport:
        """Load adapter weights from a state dict in the file's format (a LoRA file or a resume snapshot).

        Weights are copied into the existing parameters. When a module's rank (or LoKr split) in the file differs
        from the configured one, that module is rebuilt as the file has it (and the file's alpha is used
        everywhere), so "continue training from this file" works whatever rank it was trained with; call this
        before :meth:`param_groups`. A file of another algorithm is refused, naming both. strict: unmatched names on
        either side are an error; otherwise they are reported.
        """
        with torch.inference_mode(False):
            return self._load(state_dict, strict)

    def _load(self, state_dict: Mapping[str, torch.Tensor], strict: bool) -> LoadReport:
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        unexpected = []
        for key, value in state_dict.items():
            name, _, suffix = key.partition(".")
            if name in self._targets and suffix in KNOWN_SUFFIXES:
                grouped.setdefault(name, {})[suffix] = value
            else:
                unexpected.append(key)
        found = {algorithm_of(tensors) for tensors in grouped.values()} - {None}
        if found and found != {self.algorithm}:
            names = " and ".join(NAMES[a] for a in sorted(found))
            raise TrainingError(f"the LoRA weights are {names} but network.algorithm is {self.algorithm} "
                                f"({NAMES[self.algorithm]}); set network.algorithm to "
                                f"{' or '.join(sorted(found))} to continue from them, or start a fresh "
                                f"{NAMES[self.algorithm]}")
        report = LoadReport(missing=[n for n in self._targets if n not in grouped], unexpected=unexpected)
        if strict and (report.missing or report.unexpected):
            parts = []
            if report.unexpected:
                parts.append(f"{len(report.unexpected)} key(s) match no adapter of this network "
                             f"(first: {report.unexpected[0]})")
            if report.missing:
                parts.append(f"{len(report.missing)} adapter(s) are missing from it (first: {report.missing[0]})")
            raise TrainingError("the LoRA weights do not fit this network: " + "; ".join(parts) + ". They were "
                                "probably trained for another model or with another network.targets / "
                                "network.train_text_encoder setting")
        plans = [(name, *self._check_shapes(name, tensors)) for name, tensors in grouped.items()]
        for name, lay, tensors, alpha in plans:  # everything validated: now change the network
            adapter = self[name]
            if lay.shapes != adapter.layout.shapes:
                if self._optimizer_built:
                    raise TrainingError(f"{name}: rank {lay.rank} (or LoKr split) in the file differs from the "
                                        f"network's {adapter.rank}; load it before building the optimizer")
                report.rebuilt.append((name, adapter.rank, lay.rank))
                adapter = self._new_module(self._targets[name], lay, alpha)
                adapter.train(self.training)
                self.add_module(name, adapter)  # hooks look adapters up by name, so an attached hook follows
            with torch.no_grad():
                for suffix, param in adapter.named_tensors().items():
                    param.copy_(tensors[suffix])
                adapter.alpha.fill_(alpha)
            adapter.refresh_scale()
            report.loaded.append(name)
        return report

    def _check_shapes(self, name: str, tensors: dict[str, torch.Tensor]) -> tuple[Layout, dict, float]:
        """(the file's layout for this layer, its tensors in the layout's shapes, alpha)."""
        target = self._targets[name]
        try:
            lay = layout_of_file(self.algorithm, geometry_of(target), {k: tuple(v.shape) for k, v in tensors.items()})
        except ValueError as e:
            raise TrainingError(f"{name}: the {NAMES[self.algorithm]} weights for this layer are incomplete or do "
                                f"not fit it ({e}); the LoRA was made for another model") from None
        shaped = {}
        for suffix, want in lay.shapes.items():
            got = tensors[suffix] if suffix in tensors else None
            if got is not None and tuple(got.shape) != want and got.numel() == torch.Size(want).numel() \
                    and got.shape[0] == want[0]:
                got = got.reshape(want)  # ComfyUI's own trainer stores conv factors flattened to 2-D
            if got is None or tuple(got.shape) != want:
                have = {k: tuple(v.shape) for k, v in tensors.items() if k != "alpha"}
                raise TrainingError(f"{name}: shapes {have} do not fit this layer (expected "
                                    f"{dict(lay.shapes)}); the LoRA was made for another model")
            shaped[suffix] = got
        alpha = float(tensors["alpha"]) if "alpha" in tensors else float(max(lay.rank, 1))  # old files: alpha = rank
        return lay, shaped, alpha
