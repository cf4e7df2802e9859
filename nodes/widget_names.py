"""Which node and widget set each config key, so advice inside ComfyUI names what the user sees.

The engine writes settings as config keys (``optimizer.warmup_steps``); ``comfy_naming()`` gives the
:class:`~trainer.preflight.naming.Naming` that turns them into "Configure LoRA's warmup_steps". Train LoRA passes it
to the run (pre-flight problems and warnings, the memory advice) and Configure LoRA to its memory estimate. A test
checks every widget named here exists on its node, so a renamed widget cannot leave advice pointing at nothing.
Keys without a widget (``keep_last``) keep their config name.
"""
from __future__ import annotations

LOAD_DATASET = ("LoraLab_LoadDataset", "Load Dataset")
CACHE_LATENTS = ("LoraLab_CacheLatents", "Bucket & Cache Latents")
CONFIGURE = ("LoraLab_ConfigureLoRA", "Configure LoRA")
TRAIN = ("LoraLab_TrainLoRA", "Train LoRA")
SAVE = ("LoraLab_SaveLoRA", "Save LoRA")

# config key -> (node, widget)
WIDGETS: dict[str, tuple[tuple[str, str], str]] = {
    "dataset.folder": (LOAD_DATASET, "folder"),
    "dataset.caption_extension": (LOAD_DATASET, "caption_extension"),
    "dataset.trigger_word": (LOAD_DATASET, "trigger_word"),
    "dataset.default_repeats": (LOAD_DATASET, "default_repeats"),
    "dataset.shuffle_captions": (LOAD_DATASET, "shuffle_captions"),
    "dataset.keep_tokens": (LOAD_DATASET, "keep_tokens"),
    "dataset.caption_separator": (LOAD_DATASET, "caption_separator"),
    "dataset.caption_dropout": (LOAD_DATASET, "caption_dropout"),
    "buckets.resolutions": (CACHE_LATENTS, "resolution"),
    "buckets.min_bucket": (CACHE_LATENTS, "min_bucket"),
    "buckets.max_bucket": (CACHE_LATENTS, "max_bucket"),
    "buckets.step": (CACHE_LATENTS, "bucket_step"),
    "buckets.no_upscale": (CACHE_LATENTS, "no_upscale"),
    "buckets.crop": (CACHE_LATENTS, "crop"),
    "buckets.flip": (CACHE_LATENTS, "flip"),
    "network.rank": (CONFIGURE, "rank"),
    "network.alpha": (CONFIGURE, "alpha"),
    "network.conv_alpha": (CONFIGURE, "alpha"),  # derived from alpha on the node
    "network.dropout": (CONFIGURE, "dropout"),
    "network.targets": (CONFIGURE, "targets"),
    "network.conv_rank": (CONFIGURE, "conv_rank"),
    "network.train_text_encoder": (CONFIGURE, "train_text_encoder"),
    "network.init_from": (CONFIGURE, "continue_from"),
    "optimizer.name": (CONFIGURE, "optimizer"),
    "optimizer.learning_rate": (CONFIGURE, "learning_rate"),
    "optimizer.text_encoder_lr": (CONFIGURE, "text_encoder_lr"),
    "optimizer.scheduler": (CONFIGURE, "scheduler"),
    "optimizer.warmup_steps": (CONFIGURE, "warmup_steps"),
    "optimizer.weight_decay": (CONFIGURE, "weight_decay"),
    "optimizer.max_grad_norm": (CONFIGURE, "max_grad_norm"),
    "optimizer.grad_accumulation": (CONFIGURE, "grad_accumulation"),
    "objective.loss": (CONFIGURE, "loss"),
    "objective.timestep_sampling": (CONFIGURE, "timestep_sampling"),
    "objective.min_snr_gamma": (CONFIGURE, "min_snr_gamma"),
    "objective.noise_offset": (CONFIGURE, "noise_offset"),
    "mixed_precision": (CONFIGURE, "mixed_precision"),
    "gradient_checkpointing": (CONFIGURE, "gradient_checkpointing"),
    "ema_decay": (CONFIGURE, "ema_decay"),
    "clip_skip": (CONFIGURE, "clip_skip"),
    "steps": (TRAIN, "steps"),
    "batch_size": (TRAIN, "batch_size"),
    "seed": (TRAIN, "seed"),
    "save_every": (TRAIN, "save_every"),
    "preview_every": (TRAIN, "preview_every"),
    "resume_from": (TRAIN, "resume_from"),
    "allow_over_memory": (TRAIN, "allow_over_memory"),
    "output.tensorboard": (TRAIN, "tensorboard"),
    "output.numbered_loras": (TRAIN, "numbered_loras"),
    "output_dtype": (SAVE, "dtype"),
}


def widget_label(node_title: str, widget: str) -> str:
    """"Configure LoRA's warmup_steps", "Bucket & Cache Latents' resolution"."""
    possessive = "'" if node_title.endswith("s") else "'s"
    return f"{node_title}{possessive} {widget}"


def comfy_naming():
    """The Naming for advice shown in ComfyUI."""
    from ..trainer.preflight.naming import Naming

    return Naming({key: widget_label(node[1], widget) for key, (node, widget) in WIDGETS.items()})
