"""The host interface: everything the engine needs to know about a model, and nothing else.

The engine never imports ComfyUI or diffusers model classes directly. It talks to a *host*, which wraps either
ComfyUI's loaded MODEL/CLIP/VAE (``nodes/comfy_host.py``) or diffusers/transformers models
(``trainer/hosts/diffusers_host.py``). See ``ARCHITECTURE.md`` (the host).

Conventions shared by every host:

* Images given to :meth:`Host.encode_images` are float32 ``(B, H, W, 3)`` in ``[0, 1]`` (ComfyUI's IMAGE layout).
  The result is the *unscaled* latent distribution mean ``(B, C, H/8, W/8)`` in float32, as ComfyUI's VAE returns it.
* :meth:`Host.scale_latents` maps an unscaled latent into the space the denoiser trains in (``x * scale + shift``).
* Timesteps are in the schedule's own unit (see ``trainer/training/schedules.py``): integer indices ``0..999`` for
  discrete (eps / v) schedules, sigma in ``[0, 1]`` for flow schedules. The host converts them to whatever its
  denoiser expects.
* :meth:`Host.predict` returns the model output in the model's *own* parameterization (eps, v or flow velocity).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Protocol, Sequence

if TYPE_CHECKING:  # keep `import trainer.hosts.base` free of torch for start-up cost
    import torch
    from torch import nn

    from ..training.schedules import NoiseSchedule


@dataclass
class Conditioning:
    """Per-sample conditioning for one batch. Row ``i`` of every tensor belongs to sample ``i`` only."""

    context: "torch.Tensor"  # (B, tokens, width): text encoder hidden states
    pooled: Optional["torch.Tensor"] = None  # (B, P): SDXL pooled text embedding
    # (B, 6) SDXL micro-conditioning, in pixels: original_h, original_w, crop_top, crop_left, target_h, target_w
    size_ids: Optional["torch.Tensor"] = None
    # Each sample's own text-cache entry (hosts that build conditioning per sample, the DiT families: contexts of
    # different lengths and extras such as attention masks stay as the encoder made them). None: use the rows above.
    samples: Optional[list] = None

    def to(self, device=None, dtype=None) -> "Conditioning":
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        samples = None if self.samples is None else [{k: move(v) for k, v in item.items()} for item in self.samples]
        return Conditioning(move(self.context), move(self.pooled), move(self.size_ids), samples)


@dataclass
class AdapterTarget:
    """A module that may carry an adapter, under the name the LoRA file uses for it (kohya format)."""

    name: str  # e.g. "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    module: "nn.Module"  # nn.Linear or nn.Conv2d (ComfyUI's ops subclass these)
    component: str  # "unet", "te1", "te2"


@dataclass
class MemoryInfo:
    device: str  # "cuda:0", "cpu", ...
    allocated: int  # bytes in use by tensors (RSS on the CPU)
    reserved: int  # bytes held by the allocator (RSS on the CPU)
    peak: int  # peak allocated since the last reset (peak RSS on the CPU)
    total: int  # device memory (machine RAM on the CPU)
    free: int  # what could still be allocated


class Host(Protocol):
    """What a model host provides. Attributes are plain values; methods may be expensive."""

    family: str  # "sd15", "sdxl", "flux_dev", ... (trainer/families.py)
    device: "torch.device"
    dtype: "torch.dtype"  # dtype the denoiser's layers compute in (weights, or their run-time cast); see precision.py
    schedule: "NoiseSchedule"
    latent_channels: int
    context_width: int  # width of the text context the denoiser cross-attends to
    image_encoder_id: str  # stable identity of the VAE (a content hash of its weights): cache keys use it
    text_encoder_id: str  # stable identity of the text encoder(s)
    model_id: str  # stable identity of the denoiser's base weights plus any patches applied to them

    def denoiser(self) -> "nn.Module":
        """The module whose parameters are trained around (frozen) and whose forward `predict` runs."""

    def text_encoders(self) -> dict[str, "nn.Module"]:
        """Text encoder modules by component name ("te" for SD1.5, "te1"/"te2" for SDXL)."""

    def predict(self, noisy: "torch.Tensor", timesteps: "torch.Tensor", cond: Conditioning) -> "torch.Tensor":
        """Denoiser output in the model's own parameterization, for a scaled noisy latent."""

    def scale_latents(self, latents: "torch.Tensor") -> "torch.Tensor":
        """Unscaled VAE latents -> the denoiser's latent space."""

    def encode_images(self, images: "torch.Tensor") -> "torch.Tensor":
        """(B, H, W, 3) float in [0, 1] -> unscaled latent mean (B, C, H/8, W/8), float32, on the CPU."""

    def encode_text(self, captions: Sequence[str], clip_skip: int = 1) -> list[dict[str, "torch.Tensor"]]:
        """One dict per caption: {"context": (tokens, width), optionally "pooled": (P,)}, float32 on the CPU."""

    def adapter_targets(self, targets: str, conv: bool, text_encoder: bool) -> list[AdapterTarget]:
        """Modules that may carry adapters for a target set ("attention", "transformer", "full")."""

    def training_session(self, keep_text_encoder: bool = False, train_text_encoder: bool = False):
        """Context manager around training: load what training needs, undo everything on exit."""

    def gradient_checkpointing(self, enabled: bool):
        """Context manager: recompute activations in the backward pass while it is entered."""

    def memory(self) -> MemoryInfo:
        ...

    def check_interrupt(self) -> None:
        """Raise :class:`TrainingInterrupted` when the user asked to stop."""
