"""Every named choice a setting takes, in one place. Torch-free: the nodes build their drop-downs from these lists
at ComfyUI start-up, and the engine modules that implement each choice validate against the same lists."""
from __future__ import annotations

OPTIMIZERS = ("adamw", "adamw8bit", "lion8bit", "adafactor", "sgd")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")
LOSSES = ("mse", "huber", "l1")
# auto: the model family's own recipe (trainer/families.py); flux_shift: logit-normal shifted by the image's token
# count (flow models only; trainer/training/schedules.py)
TIMESTEP_SAMPLINGS = ("auto", "uniform", "logit_normal", "shifted", "flux_shift")
TARGET_SETS = ("attention", "transformer", "full")  # which layers carry adapters (trainer/adapters/targets.py)
# auto: decided from the model's weight dtype; bf16 / fp16: autocast to that dtype; no: the weights' own dtype, no
# autocast (the rule, and why an fp16 backward always gets a gradient scaler: trainer/training/precision.py)
MIXED_PRECISIONS = ("auto", "bf16", "fp16", "no")
OUTPUT_DTYPES = ("fp16", "bf16", "fp32")
CROPS = ("center", "random")
PRESETS = ("custom", "character", "style", "low memory")  # Configure LoRA's starting points (trainer/presets.py)
# the adapter each layer gets (trainer/adapters/algorithms.py): LoRA, LyCORIS LoHa / LoKr, DoRA
ALGORITHMS = ("lora", "loha", "lokr", "dora")
