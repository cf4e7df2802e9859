"""Save LoRA: write the trained LoRA into models/loras, atomically, with metadata other tools read."""
from __future__ import annotations

from comfy_api.latest import io, ui

from .types import CATEGORY


class SaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoraLab_SaveLoRA",
            display_name="Save LoRA (LoRA Lab)",
            category=f"{CATEGORY}/train",
            description="Save the LoRA in kohya format (works in ComfyUI's LoraLoader, A1111/Forge and diffusers) "
                        "under models/loras. When the run kept an EMA of the weights, the EMA LoRA is written "
                        "beside it as <filename>_ema.safetensors. LoraLoader lists new files after a refresh (R).",
            inputs=[
                io.LoraModel.Input("lora", tooltip="The LORA output of Train LoRA."),
                io.String.Input("filename", default="loralab/my_lora", tooltip="File name under models/loras; "
                                "sub-folders allowed ('loralab/my_lora'); '.safetensors' is added. An existing file "
                                "of the same name is replaced."),
                io.Combo.Input("dtype", options=["fp16", "bf16", "fp32"], default="fp16",
                               tooltip="Precision of the saved weights. fp16 is the usual choice (half the size)."),
                io.String.Input("title", default="", tooltip="Shown by LoRA browsers (modelspec.title). "
                                "Empty: the file name."),
                io.String.Input("trigger_phrase", default="", tooltip="Words that activate the LoRA "
                                "(modelspec.trigger_phrase). Empty: the trigger word used in training."),
                io.String.Input("notes", multiline=True, default="", tooltip="Free text stored in the file "
                                "(modelspec.description)."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Full path of the written file.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora, filename, dtype, title, trigger_phrase, notes) -> io.NodeOutput:
        from ..trainer.errors import TrainingError
        from ..trainer.files.lora_file import save_lora
        from ..trainer.run import ema_path
        from .paths import lora_output_path, refresh_lora_list

        if not lora:
            raise TrainingError("Save LoRA: the LORA input is empty (did Train LoRA run?)")
        path = lora_output_path(filename)
        metadata = dict(getattr(lora, "metadata", {}) or {})
        metadata["modelspec.title"] = title.strip() or path.stem
        if trigger_phrase.strip():
            metadata["modelspec.trigger_phrase"] = trigger_phrase.strip()
        if notes.strip():
            metadata["modelspec.description"] = notes.strip()
        save_lora(path, dict(lora), metadata, dtype=dtype)
        written = [path]
        ema = getattr(lora, "ema", None)
        if ema:
            written.append(ema_path(path))
            save_lora(written[-1], dict(ema), {**metadata, "modelspec.title": metadata["modelspec.title"] + " (EMA)"},
                      dtype=dtype)
        refresh_lora_list()
        return io.NodeOutput(str(path), ui=ui.PreviewText("\n".join(f"saved: {p}" for p in written)))
