"""LoRA Lab: train LoRAs inside ComfyUI on the model it already loaded.

ComfyUI imports this file at start-up, so it stays light: node classes load when ComfyUI asks for the node list,
and the engine (torch, safetensors, ...) only loads inside node execution.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import LoraLabExtension

    return LoraLabExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
