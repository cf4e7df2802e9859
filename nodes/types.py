"""Socket types passed between our nodes (plain strings; values are Python objects passed by reference)."""
from comfy_api.latest import io

Dataset = io.Custom("LORALAB_DATASET")
Latents = io.Custom("LORALAB_LATENTS")
TrainConfig = io.Custom("LORALAB_CONFIG")
CATEGORY = "LoRA Lab"
