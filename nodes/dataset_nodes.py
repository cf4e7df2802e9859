"""Load Dataset and Bucket & Cache Latents."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from comfy_api.latest import io, ui

from .types import CATEGORY, Dataset, Latents


@dataclass
class DatasetValue:
    """What flows on a LORALAB_DATASET socket."""

    dataset: object  # trainer.data.dataset.Dataset
    config: object  # trainer.config.DatasetConfig
    fingerprint: str


@dataclass
class LatentsValue:
    """What flows on a LORALAB_LATENTS socket."""

    latents: object  # trainer.data.cache.LatentSet
    dataset_config: object
    bucket_config: object
    cache_dir: Path
    image_count: int


def _dataset_config(folder, caption_extension, trigger_word, default_repeats, shuffle_captions, keep_tokens,
                    caption_separator, caption_dropout):
    from ..trainer.config import DatasetConfig
    from .paths import resolve_dataset_folder

    return DatasetConfig(
        folder=str(resolve_dataset_folder(folder)), caption_extension=caption_extension,
        trigger_word=trigger_word.strip(), default_repeats=default_repeats, shuffle_captions=shuffle_captions,
        keep_tokens=keep_tokens, caption_separator=caption_separator or ",", caption_dropout=caption_dropout,
    )


class LoadDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoraLab_LoadDataset",
            display_name="Load Dataset (LoRA Lab)",
            category=f"{CATEGORY}/data",
            description="Scan a folder of images and caption files. Bad files are skipped and listed in the report.",
            inputs=[
                io.String.Input("folder", default="", tooltip="Absolute path, or a sub-folder of ComfyUI's input "
                                "folder. kohya layout works: a sub-folder named '10_name' repeats its images 10x."),
                io.String.Input("caption_extension", default=".txt",
                                tooltip="Caption files sit next to each image with this extension (photo.png + photo.txt)."),
                io.String.Input("trigger_word", default="", tooltip="Inserted at the front of every caption that "
                                "does not already contain it. Leave empty for none."),
                io.Int.Input("default_repeats", default=1, min=1, max=1000,
                             tooltip="Repeats per epoch for images that are not inside an 'N_name' folder."),
                io.Boolean.Input("shuffle_captions", default=False, tooltip="Shuffle comma-separated tags at each "
                                 "step (the first 'keep_tokens' tags stay in place)."),
                io.Int.Input("keep_tokens", default=1, min=0, max=64,
                             tooltip="How many leading tags stay fixed when shuffling (keeps the trigger word first)."),
                io.String.Input("caption_separator", default=",", tooltip="Separator between tags for shuffling."),
                io.Float.Input("caption_dropout", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Probability of training a step with an empty caption (helps the LoRA work "
                               "without its prompt). 0.05-0.1 is common; 0 turns it off."),
            ],
            outputs=[Dataset.Output(display_name="dataset"), io.String.Output(display_name="report")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, caption_extension, **_):
        # Re-run when any image or caption in the folder changes, even if the node's settings did not.
        from ..trainer.data.dataset import fingerprint
        from .paths import resolve_dataset_folder

        try:
            return fingerprint(resolve_dataset_folder(folder), caption_extension)
        except Exception as e:  # noqa: BLE001 - a missing folder must re-run and show its error
            return f"error:{e}"

    @classmethod
    def execute(cls, folder, caption_extension, trigger_word, default_repeats, shuffle_captions, keep_tokens,
                caption_separator, caption_dropout) -> io.NodeOutput:
        from ..trainer.data.dataset import scan_dataset

        config = _dataset_config(folder, caption_extension, trigger_word, default_repeats, shuffle_captions,
                                 keep_tokens, caption_separator, caption_dropout)
        dataset = scan_dataset(config)
        report = dataset.report.to_text()
        value = DatasetValue(dataset, config, dataset.fingerprint)
        return io.NodeOutput(value, report, ui=ui.PreviewText(report))


class CacheLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoraLab_CacheLatents",
            display_name="Bucket & Cache Latents (LoRA Lab)",
            category=f"{CATEGORY}/data",
            description="Sort images into aspect-ratio buckets, crop them, and encode them once with the VAE. "
                        "The cache is content-addressed: a second run with the same images is instant.",
            inputs=[
                Dataset.Input("dataset", tooltip="From Load Dataset, Dataset from Images or Combine Datasets."),
                io.Vae.Input("vae", tooltip="The VAE of the checkpoint you will train (its latents are cached)."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64,
                             tooltip="Training resolution: buckets have about resolution x resolution pixels. "
                             "512 for SD1.5, 1024 for SDXL."),
                io.String.Input("extra_resolutions", default="", tooltip="Comma-separated extra base resolutions "
                                "to train at the same time (multi-resolution), e.g. '768, 1024'. Empty for none."),
                io.Int.Input("min_bucket", default=256, min=64, max=4096, step=64,
                             tooltip="Smallest bucket side in pixels."),
                io.Int.Input("max_bucket", default=1024, min=64, max=8192, step=64,
                             tooltip="Largest bucket side in pixels. For SDXL use 2048 to get 832x1216-style buckets."),
                io.Int.Input("bucket_step", default=64, min=8, max=256, step=8,
                             tooltip="Bucket sides are multiples of this (64 is standard; 32 is finer)."),
                io.Boolean.Input("no_upscale", default=False,
                                 tooltip="Never enlarge an image: small images get their own smaller buckets."),
                io.Combo.Input("crop", options=["center", "random"], default="center",
                               tooltip="How the overflow is cut after resizing to cover the bucket."),
                io.Boolean.Input("flip", default=False, tooltip="Also cache mirrored images and pick one at random "
                                 "each step. Don't use for asymmetric subjects (text, logos, one-sided hair)."),
                io.String.Input("cache_folder", default="", tooltip="Where cached latents and text embeddings go. "
                                "Empty: ComfyUI/output/loralab/cache."),
            ],
            outputs=[Latents.Output(display_name="latents"), io.String.Output(display_name="bucket_report")],
        )

    @classmethod
    def execute(cls, dataset, vae, resolution, extra_resolutions, min_bucket, max_bucket, bucket_step, no_upscale,
                crop, flip, cache_folder) -> io.NodeOutput:
        import comfy.utils

        from ..trainer.config import BucketConfig
        from ..trainer.data.cache import prepare_latents
        from ..trainer.errors import TrainingError
        from .comfy_host import vae_encoder
        from .paths import default_cache_dir

        try:
            extra = [int(x) for x in extra_resolutions.replace(";", ",").split(",") if x.strip()]
        except ValueError:
            raise TrainingError(f"Bucket & Cache Latents: 'extra_resolutions' must be numbers separated by commas, "
                                f"got '{extra_resolutions}'") from None
        resolutions = [resolution] + [r for r in extra if r != resolution]
        config = BucketConfig(resolutions=resolutions, min_bucket=min_bucket, max_bucket=max(max_bucket, *resolutions),
                              step=bucket_step, no_upscale=no_upscale, crop=crop, flip=flip)
        cache_dir = Path(cache_folder.strip()) if cache_folder.strip() else default_cache_dir()
        encode, encoder_id = vae_encoder(vae)
        bar = comfy.utils.ProgressBar(max(1, len(dataset.dataset.items)))
        latents = prepare_latents(dataset.dataset, config, encode, encoder_id, cache_dir / "latents",
                                  progress=lambda done, total: bar.update_absolute(done, total),
                                  check_interrupt=_throw_if_interrupted)
        report = latents.report.to_text()
        value = LatentsValue(latents, dataset.config, config, cache_dir, len(dataset.dataset.items))
        return io.NodeOutput(value, report, ui=ui.PreviewText(report))


def _throw_if_interrupted():
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()
