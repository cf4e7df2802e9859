"""Save LoRA: write the trained LoRA into models/loras, atomically, with metadata other tools read. A different LoRA
of the same name is never replaced silently: it gets ComfyUI's counter suffix, unless ``overwrite`` is on."""
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
                                "sub-folders allowed ('loralab/my_lora'); '.safetensors' is added. When a different "
                                "LoRA already has this name, a counter is added (my_lora_00001_) unless 'overwrite' "
                                "is on."),
                io.Combo.Input("dtype", options=["fp16", "bf16", "fp32"], default="fp16",
                               tooltip="Precision of the saved weights. fp16 is the usual choice (half the size)."),
                io.String.Input("title", default="", tooltip="Shown by LoRA browsers (modelspec.title). "
                                "Empty: the file name."),
                io.String.Input("trigger_phrase", default="", tooltip="Words that activate the LoRA "
                                "(modelspec.trigger_phrase). Empty: the trigger word used in training."),
                io.String.Input("notes", multiline=True, default="", tooltip="Free text stored in the file "
                                "(modelspec.description)."),
                io.Boolean.Input("overwrite", default=False, optional=True, tooltip="Replace an existing file of "
                                 "this name. Off: a different LoRA is saved as <filename>_00001_ (the next free "
                                 "number) and the existing file stays; saving the same LoRA again writes nothing."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Full path of the written file.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora, filename, dtype, title, trigger_phrase, notes, overwrite=False) -> io.NodeOutput:
        from ..trainer.errors import TrainingError
        from ..trainer.files.lora_file import holds_same_lora, save_lora
        from ..trainer.run import ema_path
        from .paths import counter_files, counter_path, lora_output_path, refresh_lora_list

        if not lora:
            raise TrainingError("Save LoRA: the LORA input is empty (did Train LoRA run?)")
        path = lora_output_path(filename)
        metadata = dict(getattr(lora, "metadata", {}) or {})
        metadata["modelspec.title"] = title.strip() or path.stem
        if trigger_phrase.strip():
            metadata["modelspec.trigger_phrase"] = trigger_phrase.strip()
        if notes.strip():
            metadata["modelspec.description"] = notes.strip()
        ema = getattr(lora, "ema", None)
        ema_metadata = {**metadata, "modelspec.title": metadata["modelspec.title"] + " (EMA)"}
        files = [(dict(lora), metadata)] + ([(dict(ema), ema_metadata)] if ema else [])

        def unchanged(at):  # this very LoRA (and its EMA twin) is already there: nothing to write
            return all(holds_same_lora(p, t, m, dtype) for p, (t, m) in zip([at, ema_path(at)], files))

        lines = []
        if not overwrite:
            same = next((p for p in [path] + counter_files(path) if unchanged(p)), None)
            if same is not None:
                return io.NodeOutput(str(same), ui=ui.PreviewText(f"unchanged: {same} already holds this LoRA"))
            if path.exists():
                kept, path = path, counter_path(path)
                lines.append(f"kept: {kept} (a different LoRA; turn on 'overwrite' to replace it)")
        for target, (tensors, meta) in zip([path, ema_path(path)], files):
            save_lora(target, tensors, meta, dtype=dtype)
            lines.append(f"saved: {target}")
        refresh_lora_list()
        return io.NodeOutput(str(path), ui=ui.PreviewText("\n".join(lines)))
