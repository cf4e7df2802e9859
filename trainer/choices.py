"""Every named choice a setting takes, in one place. Torch-free: the nodes build their drop-downs from these lists
at ComfyUI start-up, and the engine modules that implement each choice validate against the same lists."""
from __future__ import annotations

OPTIMIZERS = ("adamw", "adamw8bit", "lion8bit", "adafactor", "sgd")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")
LOSSES = ("mse", "huber", "l1")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "shifted")
TARGET_SETS = ("attention", "transformer", "full")  # which layers carry adapters (trainer/adapters/targets.py)
# auto: decided from the model's weight dtype; bf16 / fp16: autocast to that dtype; no: the weights' own dtype, no
# autocast (the rule, and why an fp16 backward always gets a gradient scaler: trainer/training/precision.py)
MIXED_PRECISIONS = ("auto", "bf16", "fp16", "no")
OUTPUT_DTYPES = ("fp16", "bf16", "fp32")
CROPS = ("center", "random")
PRESETS = ("custom", "character", "style", "low memory")  # Configure LoRA's starting points (trainer/presets.py)
