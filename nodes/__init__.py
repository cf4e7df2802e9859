"""ComfyUI-facing code: node schemas (thin) and the ComfyUI host adapter. The engine lives in ../trainer."""
from comfy_api.latest import ComfyExtension, io

from .compare_node import CompareLoRAs
from .config_node import ConfigureLoRA
from .dataset_nodes import CacheLatents, LoadDataset
from .graph_dataset_nodes import CombineDatasets, DatasetFromImages
from .lora_nodes import SaveLoRA
from .preview_node import SamplePreview
from .train_node import TrainLoRA

NODES = [LoadDataset, DatasetFromImages, CombineDatasets, CacheLatents, ConfigureLoRA, TrainLoRA, SaveLoRA,
         SamplePreview, CompareLoRAs]


class LoraLabExtension(ComfyExtension):
    async def on_load(self) -> None:
        from .routes import register_routes

        register_routes()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
