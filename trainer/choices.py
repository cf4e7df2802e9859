"""Every named choice a setting takes, in one place. Torch-free: the nodes build their drop-downs from these lists
at ComfyUI start-up, and the engine modules that implement each choice validate against the same lists."""
from __future__ import annotations

OPTIMIZERS = ("adamw", "adamw8bit", "lion8bit", "adafactor", "sgd")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")
LOSSES = ("mse", "huber", "l1")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "shifted")
TARGET_SETS = ("attention", "transformer", "full")  # which layers carry adapters (trainer/adapters/targets.py)
# auto: from the model's weight dtype (trainer/training/precision.py); fp32: full precision whatever the weights;
# bf16 / fp16: autocast to that dtype; "no" (older configs) means auto.
MIXED_PRECISIONS = ("auto", "fp32", "bf16", "fp16", "no")
OUTPUT_DTYPES = ("fp16", "bf16", "fp32")
CROPS = ("center", "random")
