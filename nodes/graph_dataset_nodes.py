"""Datasets built in the graph: Dataset from Images (IMAGE inputs and captions from other nodes) and Combine Datasets
(several datasets in one run, with optional regularisation images). Both output the same DATASET as Load Dataset."""
from __future__ import annotations

from comfy_api.latest import io, ui

from .dataset_nodes import DatasetValue
from .types import CATEGORY, Dataset

NODE = "Dataset from Images"
MAX_PARTS = 4


def _first(value, default=None):
    """A widget's value when the node takes its inputs as lists (is_input_list)."""
    if isinstance(value, list):
        return value[0] if value else default
    return default if value is None else value


class DatasetFromImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoraLab_DatasetFromImages",
            display_name="Dataset from Images (LoRA Lab)",
            category=f"{CATEGORY}/data",
            description="Make a training dataset from images in the graph (Load Image, a batch, or a list of "
                        "images of different sizes) with captions from the text box or from another node. The "
                        "latent cache keys on the pixels: changing one image re-encodes only that one.",
            is_input_list=True,
            inputs=[
                io.Image.Input("images", tooltip="An IMAGE batch, or a list of images (each keeps its own size)."),
                io.String.Input("captions", multiline=True, default="", optional=True,
                                tooltip="One caption per image, in the images' order: one per line, or a STRING "
                                "list from another node. Empty: no captions (the trigger word only)."),
                io.String.Input("trigger_word", default="", optional=True, tooltip="Inserted at the front of "
                                "every caption that does not already contain it. Leave empty for none."),
                io.Int.Input("repeats", default=1, min=1, max=1000, optional=True,
                             tooltip="How many times each image is seen per epoch."),
                io.Boolean.Input("shuffle_captions", default=False, optional=True, tooltip="Shuffle "
                                 "comma-separated tags at each step (the first 'keep_tokens' tags stay in place)."),
                io.Int.Input("keep_tokens", default=1, min=0, max=64, optional=True,
                             tooltip="How many leading tags stay fixed when shuffling (keeps the trigger word first)."),
                io.String.Input("caption_separator", default=",", optional=True,
                                tooltip="Separator between tags for shuffling."),
                io.Float.Input("caption_dropout", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Probability of training a step with an empty caption (helps the LoRA work "
                               "without its prompt). 0.05-0.1 is common; 0 turns it off."),
            ],
            outputs=[Dataset.Output(display_name="dataset"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, images, captions=None, trigger_word=None, repeats=None, shuffle_captions=None,
                keep_tokens=None, caption_separator=None, caption_dropout=None) -> io.NodeOutput:
        from ..trainer.config import DatasetConfig
        from ..trainer.data.graph_images import flatten_images, images_dataset, split_captions

        config = DatasetConfig(
            folder="", trigger_word=str(_first(trigger_word, "")).strip(), default_repeats=int(_first(repeats, 1)),
            shuffle_captions=bool(_first(shuffle_captions, False)), keep_tokens=int(_first(keep_tokens, 1)),
            caption_separator=str(_first(caption_separator, ",")) or ",",
            caption_dropout=float(_first(caption_dropout, 0.0)))
        dataset = images_dataset(flatten_images(images or []), split_captions(captions), config, node=NODE)
        report = dataset.report.to_text()
        value = DatasetValue(dataset, config, dataset.fingerprint)
        return io.NodeOutput(value, report, ui=ui.PreviewText(report))


class CombineDatasets(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        parts = [Dataset.Input(f"dataset_{i}", optional=i > 1, tooltip=(
            "A dataset (Load Dataset, Dataset from Images or another Combine Datasets). It keeps its own repeats, "
            "trigger word and caption options.")) for i in range(1, MAX_PARTS + 1)]
        return io.Schema(
            node_id="LoraLab_CombineDatasets",
            display_name="Combine Datasets (LoRA Lab)",
            category=f"{CATEGORY}/data",
            description="Train on several datasets at once (kohya's subsets): each keeps its own repeats, trigger "
                        "word and caption options. Optional regularisation (class) images train with their own "
                        "loss weight, as kohya's prior preservation does. The report shows each part.",
            inputs=parts + [
                Dataset.Input("regularization", optional=True, tooltip="Class images (e.g. 'a dog' photos for a "
                              "'ohwx dog' LoRA) that keep the model's idea of the class: prior preservation."),
                io.Float.Input("prior_loss_weight", default=1.0, min=0.0, max=10.0, step=0.05, optional=True,
                               tooltip="Loss weight of the regularisation images (kohya's prior_loss_weight; "
                               "1.0 is kohya's default). The other datasets train at weight 1."),
            ],
            outputs=[Dataset.Output(display_name="dataset"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, dataset_1, dataset_2=None, dataset_3=None, dataset_4=None, regularization=None,
                prior_loss_weight=1.0) -> io.NodeOutput:
        from ..trainer.data.combine import REGULARIZATION, Part, combine

        parts = [Part(d.dataset) for d in (dataset_1, dataset_2, dataset_3, dataset_4) if d is not None]
        if regularization is not None:
            parts.append(Part(regularization.dataset, float(prior_loss_weight), REGULARIZATION))
        dataset = combine(parts)
        report = dataset.report.to_text()
        value = DatasetValue(dataset, dataset.config, dataset.fingerprint)
        return io.NodeOutput(value, report, ui=ui.PreviewText(report))
