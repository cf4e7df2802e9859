"""How Train LoRA's previews are sampled: the family's defaults, overridden by the node's preview_* inputs.

``FAMILY_DEFAULTS`` holds the sampling recipe each model family is usually run with (KSampler's words: steps,
cfg, sampler, scheduler; the size it generates at). Add a family by adding a row: ``host.family`` picks it, and an
unknown family falls back to ``FALLBACK``. The node's inputs override a value when set (0 / "default" / empty keep
the family's); the size defaults to the training resolution, so a preview shows what the LoRA learnt at that size.
"""
from __future__ import annotations

from typing import Optional

DEFAULT = "default"  # the combo entry that keeps the family's sampler / scheduler

FAMILY_DEFAULTS: dict[str, dict] = {
    "sd15": {"steps": 20, "cfg": 7.0, "sampler": "euler", "scheduler": "normal", "size": 512},
    "sdxl": {"steps": 20, "cfg": 7.0, "sampler": "euler", "scheduler": "normal", "size": 1024},
    "sd3": {"steps": 28, "cfg": 4.5, "sampler": "dpmpp_2m", "scheduler": "sgm_uniform", "size": 1024},
    # guidance-distilled: classifier-free guidance off (cfg 1), the distilled guidance (ComfyUI's default 3.5 for
    # Flux dev) does the work
    "flux_dev": {"steps": 20, "cfg": 1.0, "sampler": "euler", "scheduler": "simple", "size": 1024},
    "flux_schnell": {"steps": 4, "cfg": 1.0, "sampler": "euler", "scheduler": "simple", "size": 1024},
    "chroma": {"steps": 26, "cfg": 4.0, "sampler": "euler", "scheduler": "beta", "size": 1024},
    "qwen_image": {"steps": 20, "cfg": 2.5, "sampler": "euler", "scheduler": "simple", "size": 1328},
    "lumina2": {"steps": 25, "cfg": 4.0, "sampler": "res_multistep", "scheduler": "simple", "size": 1024},
    "wan21": {"steps": 30, "cfg": 5.0, "sampler": "uni_pc", "scheduler": "simple", "size": 832},
    "wan22_5b": {"steps": 30, "cfg": 5.0, "sampler": "uni_pc", "scheduler": "simple", "size": 1280},
    "auraflow": {"steps": 25, "cfg": 3.5, "sampler": "uni_pc", "scheduler": "normal", "size": 1024},
    "hidream": {"steps": 30, "cfg": 5.0, "sampler": "uni_pc", "scheduler": "simple", "size": 1024},
}
FALLBACK = FAMILY_DEFAULTS["sd15"]


def family_defaults(family: str) -> dict:
    """The family's preview recipe (a copy): steps, cfg, sampler, scheduler, size."""
    return dict(FAMILY_DEFAULTS.get(family, FALLBACK))


def preview_settings(family: str, *, seed: int = 0, resolution: Optional[int] = None, steps: int = 0,
                     cfg: float = 0.0, sampler: str = DEFAULT, scheduler: str = DEFAULT, negative: str = "",
                     width: int = 0, height: int = 0) -> dict:
    """Keyword arguments for ``preview_node.preview_grid``: the family's defaults with the node's overrides.
    ``resolution``: the training resolution (the default size); width/height are rounded down to multiples of 8."""
    base = family_defaults(family)
    size = int(resolution or base["size"])
    return {
        "steps": int(steps) if steps and steps > 0 else base["steps"],
        "cfg": float(cfg) if cfg and cfg > 0 else base["cfg"],
        "sampler": sampler if sampler and sampler != DEFAULT else base["sampler"],
        "scheduler": scheduler if scheduler and scheduler != DEFAULT else base["scheduler"],
        "negative": negative or "",
        "seed": int(seed),
        "width": _multiple_of_8(width or size),
        "height": _multiple_of_8(height or size),
    }


def _multiple_of_8(value: int) -> int:
    return max(8, int(value) // 8 * 8)
