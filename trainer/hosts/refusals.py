"""The wording of the refusals both hosts share: what was found, what LoRA Lab trains, and what to load instead.

Each host decides *whether* to refuse from its own evidence (ComfyUI's model config class, a diffusers folder's config
files); the text lives here so the ComfyUI node and the headless CLI say the same thing.
"""
from __future__ import annotations

from ..errors import TrainingError

SUPPORTED = "LoRA Lab trains SD1.5 and SDXL models today"


def sd2_refusal(detected: str, load_instead: str) -> TrainingError:
    """SD2.x looks like SD1.5 (same UNet layout, 4-channel latents) but has another text encoder (and often v-pred)."""
    return TrainingError(
        f"this is an SD2.x model ({detected}): SD2.x has its own text encoder (OpenCLIP ViT-H, 1024-wide context) and "
        f"its 768 px models are v-prediction, so it cannot be trained as SD1.5 and is not supported yet. {SUPPORTED}: "
        f"{load_instead}. A LoRA trained on SD1.5 or SDXL does not work on SD2.x.")


def input_channels_refusal(in_channels: int, latent_channels: int, kind: str | None, detected: str,
                           load_instead: str, family: str | None = None) -> TrainingError:
    """A UNet that takes more than the latents (inpainting, instruct-pix2pix, ...) would fail later with a shape error.

    ``kind``: "inpainting", "instruct-pix2pix" or None (unknown: the message then names ``detected``); ``family``:
    "SD1.5" / "SDXL" when the base family is known, so the advice can name the checkpoint to load.
    """
    base = f"the base {family} checkpoint" if family else "the base checkpoint of the same family"
    if kind == "inpainting":
        return TrainingError(
            f"this is an inpainting checkpoint ({in_channels}-channel UNet input: {latent_channels} latent channels "
            f"plus a mask and the masked image, which training does not provide); train on {base} instead - a LoRA "
            "trained there also works on the inpainting model.")
    if kind == "instruct-pix2pix":
        return TrainingError(
            f"this is an instruct-pix2pix checkpoint ({in_channels}-channel UNet input: {latent_channels} latent "
            f"channels plus the input image, which training does not provide); train on {base} instead - a LoRA "
            "trained there usually works on the edit model too.")
    return TrainingError(
        f"this model's UNet takes {in_channels} input channels but its latents have {latent_channels} ({detected}): "
        "it expects extra image conditioning concatenated to the latents, which training does not provide. "
        f"{SUPPORTED} on their plain {latent_channels}-channel UNets: {load_instead}.")
