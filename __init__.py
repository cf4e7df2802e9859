"""LoRA Lab: train LoRAs inside ComfyUI on the model it already loaded.

ComfyUI imports this file at start-up, so it stays light: node classes load when ComfyUI asks for the node list,
and the engine (torch, safetensors, ...) only loads inside node execution.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import LoraLabExtension
    from .nodes.routes import register_routes

    # The live panel's HTTP routes must be in PromptServer.routes before the server starts. ComfyUI 0.3.x never calls
    # ComfyExtension.on_load (newer versions do; register_routes is idempotent), so register them here as well.
    register_routes()
    return LoraLabExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
