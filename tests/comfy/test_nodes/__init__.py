"""Test-only ComfyUI nodes, linked into the test server's custom_nodes as ``loralab_test_nodes`` by the harness.

Never shipped: they only exist to make integration tests cheaper or observable.
* LoraLabTest_TinyCheckpointLoader: CheckpointLoaderSimple with fewer text-encoder layers (te_layers), so CLIP
  encoding of the tiny checkpoints costs ~10x less on CPU; te_layers=0 loads the full encoders.
* LoraLabTest_SendEvent: sends one custom websocket event (checks the harness's websocket client).
* LoraLabTest_Wait: runs N ProgressBar steps of `step_s` seconds, checking for interrupt (tests Cancel/interrupt).
* LoraLabTest_StringList: one STRING per line as a list output (captions for Dataset from Images, as a captioning
  node would hand them on).
"""


class LoraLabTest_TinyCheckpointLoader:
    CATEGORY = "LoRA Lab/testing"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),),
                             "te_layers": ("INT", {"default": 3, "min": 0, "max": 32})}}

    def load(self, ckpt_name, te_layers):
        import comfy.sd
        import folder_paths

        opts = {}
        if te_layers:
            opts = {"clip_l_model_config": {"num_hidden_layers": te_layers},
                    "clip_g_model_config": {"num_hidden_layers": te_layers}}
        path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        out = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True,
                                                    embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                                    te_model_options=opts)
        return out[:3]


class LoraLabTest_SendEvent:
    CATEGORY = "LoRA Lab/testing"
    RETURN_TYPES = ()
    FUNCTION = "send"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"event": ("STRING", {"default": "loralab_test.event"}),
                             "payload": ("STRING", {"default": "{}"})},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def send(self, event, payload, unique_id=None):
        import json

        from server import PromptServer

        inst = PromptServer.instance
        data = dict(json.loads(payload), node=unique_id, prompt_id=inst.last_prompt_id)
        inst.send_sync(event, data, inst.client_id)
        return {}


class LoraLabTest_Wait:
    CATEGORY = "LoRA Lab/testing"
    RETURN_TYPES = ("INT",)
    FUNCTION = "wait"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": ("INT", {"default": 10, "min": 1, "max": 100000}),
                             "step_s": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 60.0})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def wait(self, steps, step_s):
        import time

        import comfy.model_management
        import comfy.utils

        pbar = comfy.utils.ProgressBar(steps)
        for _ in range(steps):
            time.sleep(step_s)
            comfy.model_management.throw_exception_if_processing_interrupted()
            pbar.update(1)
        return (steps,)


class LoraLabTest_StringList:
    """One STRING per line, as a list output (OUTPUT_IS_LIST): what a captioning node hands on per image."""

    CATEGORY = "LoRA Lab/testing"
    RETURN_TYPES = ("STRING",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "split"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "", "multiline": True})}}

    def split(self, text):
        return ([line for line in text.splitlines() if line.strip()],)


NODE_CLASS_MAPPINGS = {
    "LoraLabTest_TinyCheckpointLoader": LoraLabTest_TinyCheckpointLoader,
    "LoraLabTest_SendEvent": LoraLabTest_SendEvent,
    "LoraLabTest_Wait": LoraLabTest_Wait,
    "LoraLabTest_StringList": LoraLabTest_StringList,
}
NODE_DISPLAY_NAME_MAPPINGS = {k: k.replace("LoraLabTest_", "LoRA Lab test: ") for k in NODE_CLASS_MAPPINGS}
