"""Sample Preview: images from ComfyUI's own sampler, base vs LoRA per prompt, as a labelled grid.

Train LoRA uses the same code every N steps (with the adapters live on the training model, switched between
strengths by their multiplier) to show previews on the node and keep them in the run folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from comfy_api.latest import io

from .types import CATEGORY

LABEL_HEIGHT = 20
ROW_LABEL_CHARS = 28


def parse_prompts(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def parse_strengths(text: str) -> list[float]:
    from ..trainer.errors import TrainingError

    try:
        values = [float(x) for x in (text or "").replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise TrainingError(f"Sample Preview: 'strengths' must be numbers separated by commas, got '{text}'") from None
    return values or [1.0]


def sample_one(model, clip, vae, prompt: str, negative: str, seed: int, steps: int, cfg: float, sampler: str,
               scheduler: str, width: int, height: int) -> torch.Tensor:
    """One image (H, W, 3) in [0, 1] through the calls KSampler makes (``comfy.sample``: the same noise for the same
    seed, the same sampler), without importing ComfyUI's top-level ``nodes`` module."""
    import comfy.model_management
    import comfy.sample

    def encode(text):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    channels = model.model.latent_format.latent_channels
    latent = torch.zeros([1, channels, height // 8, width // 8], device=comfy.model_management.intermediate_device())
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed, None)
    samples = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, encode(prompt), encode(negative), latent,
                                  disable_pbar=True, seed=seed)
    return vae.decode(samples)[0].float().cpu()


def make_grid(rows: Sequence[Sequence[torch.Tensor]], row_labels: Sequence[str], col_labels: Sequence[str]):
    """A PIL grid: one row per prompt, one column per LoRA strength, with labels."""
    from PIL import Image, ImageDraw

    h, w = rows[0][0].shape[:2]
    label_w = 6 * ROW_LABEL_CHARS
    grid = Image.new("RGB", (label_w + w * len(col_labels), LABEL_HEIGHT + h * len(rows)), (24, 24, 24))
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(col_labels):
        draw.text((label_w + c * w + 4, 4), label, fill=(230, 230, 230))
    for r, (row, label) in enumerate(zip(rows, row_labels)):
        words, lines = label.split(), [""]
        for word in words:  # wrap the prompt into the label column
            if len(lines[-1]) + len(word) + 1 > ROW_LABEL_CHARS:
                lines.append("")
            lines[-1] = (lines[-1] + " " + word).strip()
        draw.multiline_text((4, LABEL_HEIGHT + r * h + 4), "\n".join(lines[: max(1, h // 12)]), fill=(230, 230, 230))
        for c, image in enumerate(row):
            pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            grid.paste(Image.fromarray(pixels), (label_w + c * w, LABEL_HEIGHT + r * h))
    return grid


def pil_to_image_tensor(image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).unsqueeze(0)


def preview_grid(model_for_strength: Callable[[float], object], clip, vae, prompts: Sequence[str], strengths,
                 negative="", seed=0, steps=20, cfg=7.0, sampler="euler", scheduler="normal", width=512, height=512):
    rows = []
    for prompt in prompts:
        rows.append([sample_one(model_for_strength(s), clip, vae, prompt, negative, seed, steps, cfg, sampler,
                                scheduler, width, height) for s in strengths])
    labels = [("base" if s == 0 else f"LoRA x{s:g}") for s in strengths]
    return make_grid(rows, prompts, labels)


def training_preview(host, network, prompts: Sequence[str], strengths: Sequence[float], run_dir: Path, step: int,
                     settings: dict) -> Optional[str]:
    """Render a preview grid with the live adapters (multiplier = strength) and save it in the run folder."""
    from ..trainer.files.atomic import write_with

    def model_at(strength: float):
        network.set_multiplier(strength)
        return host.patcher

    try:
        grid = preview_grid(model_at, host.clip, host.vae, prompts, strengths, **settings)
    finally:
        network.set_multiplier(1.0)
        host.reload()
    name = f"step_{step:06d}.png"
    write_with(Path(run_dir) / "previews" / name, lambda p: grid.save(p, format="PNG"))
    return f"previews/{name}"


class SamplePreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import comfy.samplers

        return io.Schema(
            node_id="LoraLab_SamplePreview",
            display_name="Sample Preview (LoRA Lab)",
            category=f"{CATEGORY}/preview",
            description="Render each prompt with ComfyUI's sampler at several LoRA strengths (0 = base model) "
                        "and show a labelled grid.",
            inputs=[
                io.Model.Input("model", tooltip="The base model (not Train LoRA's MODEL output, which already has "
                               "the LoRA applied)."),
                io.Clip.Input("clip", tooltip="Encodes the prompts (use the CLIP the LoRA was trained with)."),
                io.Vae.Input("vae", tooltip="Decodes the sampled latents into images."),
                io.LoraModel.Input("lora", optional=True, tooltip="The LORA output of Train LoRA. Without it, "
                                   "every column shows the base model."),
                io.String.Input("prompts", multiline=True, default="a photo of sks",
                                tooltip="One prompt per line; each becomes a row of the grid."),
                io.String.Input("negative", multiline=True, default="", tooltip="Negative prompt for every image."),
                io.String.Input("strengths", default="0, 0.5, 1",
                                tooltip="LoRA strengths, one column each (0 = base model)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Same seed for every cell, "
                             "so columns differ only by the LoRA."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampling steps."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=30.0, step=0.5, tooltip="Classifier-free guidance."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="ComfyUI sampler, as in KSampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="Noise schedule, as in KSampler."),
                io.Int.Input("width", default=512, min=64, max=4096, step=64, tooltip="Image width in pixels."),
                io.Int.Input("height", default=512, min=64, max=4096, step=64, tooltip="Image height in pixels."),
            ],
            outputs=[io.Image.Output(display_name="grid")],
        )

    @classmethod
    def execute(cls, model, clip, vae, prompts, negative, strengths, seed, steps, cfg, sampler_name, scheduler,
                width, height, lora=None) -> io.NodeOutput:
        import comfy.sd
        from comfy_api.latest import ui

        from ..trainer.errors import TrainingError

        prompt_list = parse_prompts(prompts)
        if not prompt_list:
            raise TrainingError("Sample Preview: 'prompts' is empty; write at least one prompt (one per line)")

        def model_at(strength: float):
            if lora is None or strength == 0:
                return model
            return comfy.sd.load_lora_for_models(model, None, lora, strength, 0)[0]

        grid = preview_grid(model_at, clip, vae, prompt_list, parse_strengths(strengths), negative, seed, steps, cfg,
                            sampler_name, scheduler, width, height)
        image = pil_to_image_tensor(grid)
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))
