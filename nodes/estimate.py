"""The memory estimate as both training nodes show it: Train LoRA (its exact batch) and Configure LoRA (a table of
batch sizes, when a MODEL and latents are connected to it)."""
from __future__ import annotations

import dataclasses

BATCH_TABLE = (1, 2, 4, 8)


def estimate_for(host, cfg, latents, batch_size: int, keep_text_encoder: bool, batch_table=()):
    """Estimate training ``cfg`` on ``host`` at the largest bucket the cached latents use. Call it inside
    ``host.training_session()`` (the estimate traces the loaded model)."""
    from ..trainer.preflight.memory import estimate_training_memory
    from .widget_names import comfy_naming

    buckets = sorted({s.bucket for s in latents.latents.samples})
    return estimate_training_memory(host, cfg, buckets, batch_size=batch_size,
                                    resident_encoders=keep_text_encoder, batch_table=batch_table,
                                    naming=comfy_naming())


def configure_estimate_text(model, latents, cfg, clip=None) -> str:
    """Configure LoRA's estimate: what training ``cfg`` on this model and data needs, per batch size."""
    from ..trainer.errors import TrainingError
    from ..trainer.training.loop import text_encoder_stays_loaded
    from .comfy_host import ComfyHost

    if model is None or latents is None:
        missing = "MODEL" if model is None else "latents"
        return f"Memory estimate: connect {missing} as well to see it here (Train LoRA always checks before it starts)."
    note = "(batch 1 above; Train LoRA re-checks at its own batch size before it starts)"
    if cfg.network.train_text_encoder and clip is None:
        # no CLIP here: estimate the UNet part and say what is left out
        cfg = dataclasses.replace(cfg, network=dataclasses.replace(cfg.network, train_text_encoder=False))
        note = ("(batch 1 above, without the text encoder, which this node cannot see; Train LoRA re-checks with "
                "it and its own batch size before it starts)")
    try:
        host = ComfyHost(model.clone(), clip, None)
        keep = text_encoder_stays_loaded(cfg, latents.dataset_config)
        with host.training_session(keep, cfg.network.train_text_encoder):
            estimate = estimate_for(host, cfg, latents, 1, keep, BATCH_TABLE)
    except TrainingError as e:
        return f"Memory estimate: not available: {e}"
    return estimate.to_text() + "\n  " + note
