"""The LoRA adapter network: kohya-compatible modules attached to the host model with forward hooks.

Nothing in the host model is replaced or re-parented: :meth:`LoRANetwork.attach` registers one forward hook per
target module that adds ``scale * multiplier * up(down(dropout(x)))`` to the module's output, and
:meth:`LoRANetwork.detach` removes exactly those hooks. The targets are kept in a plain dict, so they are not
submodules of the network: ``network.parameters()`` / ``state_dict()`` hold the adapters only, and
``network.to(device)`` never moves the base model.

Adapters are fp32 by default whatever dtype the host runs in: the hook casts the input to the adapter dtype and
the delta back to the output dtype. ``network.state_dict()`` keys are the kohya keys
(``<name>.lora_down.weight``, ``<name>.lora_up.weight``, ``<name>.alpha``).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from ..config import NetworkConfig
from ..errors import ConfigError, TrainingError
from ..hosts.base import AdapterTarget

COMPONENT_ORDER = ("unet", "te", "te1", "te2")


class LoRAModule(nn.Module):
    """One adapter: ``lora_down`` (in -> r; for a conv, the target's kernel/stride/padding/dilation) and
    ``lora_up`` (r -> out; a 1x1 conv for convs), initialised like kohya (down kaiming-uniform a=sqrt(5), up 0)."""

    def __init__(self, target: nn.Module, rank: int, alpha: Optional[float], dropout: float = 0.0,
                 multiplier: float = 1.0, generator: Optional[torch.Generator] = None):
        super().__init__()
        if isinstance(target, nn.Conv2d):
            if target.groups != 1:
                raise ConfigError(f"grouped convolutions (groups={target.groups}) cannot carry a LoRA")
            self.lora_down = nn.Conv2d(target.in_channels, rank, target.kernel_size, target.stride, target.padding,
                                       target.dilation, bias=False, padding_mode=target.padding_mode)
            self.lora_up = nn.Conv2d(rank, target.out_channels, 1, bias=False)
        elif isinstance(target, nn.Linear):
            self.lora_down = nn.Linear(target.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, target.out_features, bias=False)
        else:
            raise TypeError(f"LoRA targets must be nn.Linear or nn.Conv2d, got {type(target).__name__}")
        self.rank = rank
        # kohya: alpha 0 or None means alpha = rank (scale 1)
        self.register_buffer("alpha", torch.tensor(float(alpha) if alpha else float(rank)))
        self.scale = float(self.alpha) / rank  # cached: reading the buffer each forward would sync the GPU
        self.multiplier = multiplier
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_up.weight)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_scale())

    def refresh_scale(self) -> None:
        self.scale = float(self.alpha) / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The delta this adapter adds to its target's output for input ``x`` (in the adapter's dtype)."""
        x = self.dropout(x.to(self.lora_down.weight.dtype))
        return self.lora_up(self.lora_down(x)) * (self.scale * self.multiplier)

    def delta_weight(self) -> torch.Tensor:
        """up @ down * scale * multiplier in fp32, shaped like the target's weight (conv-aware)."""
        down = self.lora_down.weight.float()
        up = self.lora_up.weight.float().flatten(1)  # (out, r)
        delta = up @ down if down.ndim == 2 else torch.einsum("or,rikl->oikl", up, down)
        return delta * (self.scale * self.multiplier)


@dataclass
class LoadReport:
    """What :meth:`LoRANetwork.load_kohya_state_dict` did."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # adapters of the network that the file lacks (left as init)
    unexpected: list[str] = field(default_factory=list)  # keys of the file that match no adapter (ignored)
    rebuilt: list[tuple[str, int, int]] = field(default_factory=list)  # (name, config rank, file rank)


def _io_dims(module: nn.Module) -> tuple[int, int]:
    """(effective input size, output size) of a target: the largest rank that still means anything is min of both."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels * math.prod(module.kernel_size), module.out_channels
    return module.in_features, module.out_features


def _weight_device(module: nn.Module) -> torch.device:
    weight = getattr(module, "weight", None)
    if weight is None or weight.device.type == "meta":
        return torch.device("cpu")
    return weight.device


class LoRANetwork(nn.Module):
    """Adapters for a list of :class:`AdapterTarget`, ranks from :class:`NetworkConfig`.

    Linear and 1x1 conv targets get ``rank``/``alpha``; 3x3 (any non-1x1) conv targets get ``conv_rank``/
    ``conv_alpha``, or ``rank``/``alpha`` when ``conv_rank`` is 0. A rank larger than a layer's
    min(in, out) is an error naming the setting and the layer.
    """

    def __init__(self, targets: Sequence[AdapterTarget], config: Optional[NetworkConfig] = None, *,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                 generator: Optional[torch.Generator] = None, multiplier: float = 1.0):
        super().__init__()
        with torch.inference_mode(False):  # ComfyUI runs nodes under inference_mode: keep parameters trainable
            self._build(targets, config, dtype, device, generator, multiplier)

    def _build(self, targets, config, dtype, device, generator, multiplier) -> None:
        self.config = config or NetworkConfig()
        if not targets:
            raise ConfigError(f"no modules to train for network.targets='{self.config.targets}': the model has none "
                              "of the layers these targets adapt")
        self._targets: dict[str, nn.Module] = {}  # a plain dict: the base model is never a submodule of ours
        self._components: dict[str, str] = {}
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._optimizer_built = False
        self._dtype, self._device, self._multiplier = dtype, device, multiplier
        too_big = []
        for t in targets:
            if t.name in self._targets:
                raise ValueError(f"duplicate adapter name {t.name}")
            rank, alpha, setting = self._rank_alpha(t.module)
            if rank < 1:
                raise ConfigError(f"{setting} must be at least 1 (got {rank})")
            if rank > min(_io_dims(t.module)):
                too_big.append((t.name, rank, setting, _io_dims(t.module)))
                continue
            self._targets[t.name] = t.module
            self._components[t.name] = t.component
            self.add_module(t.name, self._new_module(t.module, rank, alpha, generator))
        if too_big:
            name, rank, setting, (fan_in, fan_out) = too_big[0]
            more = f" (and {len(too_big) - 1} more layers)" if len(too_big) > 1 else ""
            raise ConfigError(f"{setting}={rank} is larger than layer {name} allows (in {fan_in}, out {fan_out}: at "
                              f"most {min(fan_in, fan_out)}){more}. Lower {setting} to {min(fan_in, fan_out)} or less")

    def _rank_alpha(self, module: nn.Module) -> tuple[int, float, str]:
        from .targets import is_conv3x3

        cfg = self.config
        if is_conv3x3(module) and cfg.conv_rank > 0:
            return int(cfg.conv_rank), float(cfg.conv_alpha), "network.conv_rank"
        return int(cfg.rank), float(cfg.alpha), "network.rank"

    def _new_module(self, target: nn.Module, rank: int, alpha: float,
                    generator: Optional[torch.Generator] = None) -> LoRAModule:
        lora = LoRAModule(target, rank, alpha, self.config.dropout, self._multiplier, generator)  # built on the CPU
        return lora.to(device=self._device or _weight_device(target), dtype=self._dtype)

    def _apply(self, fn, recurse=True):
        with torch.inference_mode(False):  # .to()/.cuda() under inference_mode would make inference tensors
            return super()._apply(fn, recurse)

    # --- access ---------------------------------------------------------------------------------------------------
    def lora_modules(self) -> dict[str, LoRAModule]:
        return {name: self._modules[name] for name in self._targets}

    def __getitem__(self, name: str) -> LoRAModule:
        return self._modules[name]

    def __len__(self) -> int:
        return len(self._targets)

    def __repr__(self) -> str:
        counts = {c: list(self._components.values()).count(c) for c in COMPONENT_ORDER if c in self._components.values()}
        return f"LoRANetwork({len(self)} adapters {counts}, rank {self.config.rank}, alpha {self.config.alpha})"

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
            if name not in self._handles:
                self._handles[name] = target.register_forward_hook(self._make_hook(name), with_kwargs=True)
        return self

    def detach(self) -> None:
        """Remove exactly the hooks :meth:`attach` added. Idempotent; the host is then as it was before."""
        while self._handles:
            _, handle = self._handles.popitem()
            handle.remove()

    def _make_hook(self, name: str):
        modules = self._modules  # looked up per call, so a module rebuilt by a load is picked up

        def hook(_module, args, kwargs, output):
            lora = modules[name]
            if lora.multiplier == 0:
                return output
            x = args[0] if args else (kwargs["input"] if "input" in kwargs else next(iter(kwargs.values())))
            return output + lora(x).to(output.dtype)

        return hook

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
    def param_groups(self, unet_lr: float, te_lr: Optional[float] = None) -> list[dict]:
        """One optimizer group per component ("unet", "te", "te1", "te2"), each with its LR (te_lr None -> unet_lr).

        A component whose LR is 0 is frozen (requires_grad False) and left out, as kohya does.
        """
        te_lr = unet_lr if te_lr is None else te_lr
        groups = []
        for component in COMPONENT_ORDER:
            params = [p for name, lora in self.lora_modules().items() if self._components[name] == component
                      for p in lora.parameters()]
            if not params:
                continue
            lr = unet_lr if component == "unet" else te_lr
            if lr == 0:
                for p in params:
                    p.requires_grad_(False)
                continue
            groups.append({"params": params, "lr": lr, "name": component})
        self._optimizer_built = True
        return groups

    # --- kohya state dict -----------------------------------------------------------------------------------------
    def kohya_state_dict(self, dtype: torch.dtype = torch.float32, device="cpu") -> dict[str, torch.Tensor]:
        """Copies of the adapter tensors under kohya keys; alpha stays an fp32 0-dim tensor (exact)."""
        out = {}
        for name, lora in self.lora_modules().items():
            out[f"{name}.lora_down.weight"] = lora.lora_down.weight.detach().to(device, dtype, copy=True)
            out[f"{name}.lora_up.weight"] = lora.lora_up.weight.detach().to(device, dtype, copy=True)
            out[f"{name}.alpha"] = lora.alpha.detach().to(device, torch.float32, copy=True).reshape(())
        return out

    def load_kohya_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> LoadReport:
        """Load adapter weights from a kohya state dict (a LoRA file or a resume snapshot).

        Weights are copied into the existing parameters. When a module's rank in the file differs from the
        configured one, that module is rebuilt with the file's rank (and the file's alpha is used everywhere), so
        "continue training from this file" works whatever rank it was trained with; call this before
        :meth:`param_groups`. strict: unmatched names on either side are an error; otherwise they are reported.
        """
        with torch.inference_mode(False):
            return self._load(state_dict, strict)

    def _load(self, state_dict: Mapping[str, torch.Tensor], strict: bool) -> LoadReport:
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        unexpected = []
        for key, value in state_dict.items():
            name, _, suffix = key.partition(".")
            if name in self._targets and suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
                grouped.setdefault(name, {})[suffix] = value
            else:
                unexpected.append(key)
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
        plans = [(name, self._check_shapes(name, tensors)) for name, tensors in grouped.items()]
        for name, (down, up, alpha) in plans:  # everything validated: now change the network
            lora = self[name]
            if down.shape[0] != lora.rank:
                if self._optimizer_built:
                    raise TrainingError(f"{name}: rank {down.shape[0]} in the file differs from the network's "
                                        f"{lora.rank}; load it before building the optimizer")
                report.rebuilt.append((name, lora.rank, down.shape[0]))
                lora = self._new_module(self._targets[name], down.shape[0], alpha)
                lora.train(self.training)
                self.add_module(name, lora)  # hooks look adapters up by name, so an attached hook follows
            with torch.no_grad():
                lora.lora_down.weight.copy_(down)
                lora.lora_up.weight.copy_(up)
                lora.alpha.fill_(alpha)
            lora.refresh_scale()
            report.loaded.append(name)
        return report

    def _check_shapes(self, name: str, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float]:
        if "lora_down.weight" not in tensors or "lora_up.weight" not in tensors:
            raise TrainingError(f"{name}: the LoRA weights have no lora_down/lora_up pair for this layer")
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        lora = self[name]
        rank = down.shape[0]
        want_down = (rank, *lora.lora_down.weight.shape[1:])
        want_up = (lora.lora_up.weight.shape[0], rank, *lora.lora_up.weight.shape[2:])
        if down.ndim == 2 and len(want_down) == 4 and down.numel() == math.prod(want_down):
            down = down.reshape(want_down)  # ComfyUI's own trainer stores conv downs flattened to 2-D
        if up.ndim == 2 and len(want_up) == 4:
            up = up.reshape(want_up)
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            raise TrainingError(f"{name}: shapes {tuple(down.shape)} / {tuple(up.shape)} do not fit this layer "
                                f"(expected {want_down} / {want_up}); the LoRA was made for another model")
        alpha = float(tensors["alpha"]) if "alpha" in tensors else float(rank)  # old files: alpha = rank
        return down, up, alpha
