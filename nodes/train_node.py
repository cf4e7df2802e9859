"""Train LoRA: trains adapters on the MODEL ComfyUI already loaded and returns it with the LoRA applied.

A finished run is kept under a key of everything that determines its result (model, data, settings), so
re-queueing the same graph after ComfyUI evicted its cache reuses it. Stop saves a resumable state; queueing the
same graph again continues from it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from comfy_api.latest import io

from .types import CATEGORY, Latents, TrainConfig

EVENT = "loralab.progress"


class LoraStateDict(dict):
    """A kohya-keyed LoRA state dict (what core nodes expect on LORA_MODEL) that also carries its metadata and, when
    the run kept an EMA of the adapter weights, the EMA weights (``ema``, another LoraStateDict) for Save LoRA."""

    def __init__(self, tensors, metadata=None, ema=None):
        super().__init__(tensors)
        self.metadata = dict(metadata or {})
        self.ema = ema


def _send(payload: dict) -> None:
    from server import PromptServer

    server = PromptServer.instance
    server.send_sync(EVENT, payload, server.client_id)


class TrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoraLab_TrainLoRA",
            display_name="Train LoRA (LoRA Lab)",
            category=f"{CATEGORY}/train",
            description="Train a LoRA on the loaded model. The input MODEL is never changed; the MODEL output is a "
                        "copy with the trained LoRA applied, ready for KSampler. Loss and memory show live on the "
                        "node. Stop saves a resumable state: queue again to continue.",
            inputs=[
                io.Model.Input("model", tooltip="The model to train on, e.g. from Load Checkpoint."),
                io.Clip.Input("clip", tooltip="Its text encoder(s): captions are encoded with it (and cached)."),
                Latents.Input("latents", tooltip="From Bucket & Cache Latents."),
                TrainConfig.Input("config", tooltip="From Configure LoRA."),
                io.Int.Input("steps", default=1000, min=1, max=1000000, tooltip="Optimizer steps to train."),
                io.Int.Input("batch_size", default=1, min=1, max=256, tooltip="Images per step (from one bucket)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seeds noise, timesteps, order and flips: same seed, same result."),
                io.Int.Input("save_every", default=250, min=0, max=1000000,
                             tooltip="Save a resumable state every N steps (0 = only at the end or on Stop)."),
                io.String.Input("run_name", default="my_lora", tooltip="Name of the run folder under "
                                "output/loralab/runs (a key of the settings is appended)."),
                io.Vae.Input("vae", optional=True, tooltip="Needed only for preview images during training."),
                io.String.Input("preview_prompts", multiline=True, default="", optional=True,
                                tooltip="One prompt per line, rendered base vs LoRA every 'preview_every' steps."),
                io.Int.Input("preview_every", default=0, min=0, max=1000000, optional=True,
                             tooltip="Render previews every N steps (0 = never). Each preview costs sampling time."),
                io.String.Input("resume_from", default="", optional=True, tooltip="A run folder name (or path) to "
                                "continue. Empty: a stopped run with these exact settings continues by itself."),
                io.Boolean.Input("allow_over_memory", default=False, optional=True, tooltip="Start even when the "
                                 "memory estimate says it will not fit."),
                io.Combo.Input("model_weights", options=["trained", "ema"], default="trained", optional=True,
                               tooltip="Which LoRA weights the MODEL output carries: the trained ones, or their "
                               "moving average (needs ema_decay > 0 in Configure LoRA). The LORA output carries "
                               "both, and Save LoRA writes both files."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The input model with the trained LoRA applied."),
                io.Clip.Output(display_name="clip", tooltip="The CLIP, with text-encoder adapters if trained."),
                io.LoraModel.Output(display_name="lora", tooltip="The LoRA (kohya keys): connect to Save LoRA."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per step."),
                io.Image.Output(display_name="loss_plot", tooltip="The loss curve as an image."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, latents, config, steps, batch_size, seed, save_every, run_name, vae=None,
                preview_prompts="", preview_every=0, resume_from="", allow_over_memory=False,
                model_weights="trained") -> io.NodeOutput:
        import comfy.sd

        from ..trainer.errors import TrainingError
        from ..trainer.monitor.plot import image_to_tensor, render_loss_plot
        from ..trainer.monitor.runlog import read_history
        from .comfy_host import ComfyHost

        cfg = dataclasses.replace(config, steps=steps, batch_size=batch_size, seed=seed, save_every=save_every)
        if model_weights == "ema" and cfg.ema_decay <= 0:
            raise TrainingError("Train LoRA: model_weights is 'ema' but Configure LoRA's ema_decay is 0, so there "
                                "are no EMA weights; set ema_decay (e.g. 0.999) or choose 'trained'")
        host = ComfyHost(model.clone(), clip, vae)
        result = _run(host, latents, cfg, run_name, resume_from, cls.hidden.unique_id, preview_prompts,
                      preview_every, allow_over_memory)
        ema = LoraStateDict(result.ema, result.metadata) if result.ema is not None else None
        lora = LoraStateDict(result.lora, result.metadata, ema=ema)
        applied = ema if model_weights == "ema" else lora
        model_out, clip_out = comfy.sd.load_lora_for_models(model, clip, applied, 1.0, 1.0)
        plot = image_to_tensor(render_loss_plot(read_history(result.run_dir), title=result.run_dir.name))
        text = result.summary() + (f"\nMODEL output: {model_weights} weights" if ema is not None else "")
        if result.estimate:
            text += "\n" + result.estimate
        return io.NodeOutput(model_out, clip_out, lora, {"loss": list(result.losses)}, plot,
                             ui={"text": [text], "loralab_run": [result.run_dir.name]})


def _run(host, latents, cfg, run_name: str, resume_from: str, node_id, preview_prompts: str, preview_every: int,
         allow_over_memory: bool):
    """The engine's Run, with ComfyUI's progress bar, Stop, live events and previews wired in."""
    import comfy.model_management as mm
    import comfy.utils

    from ..trainer.errors import TrainingError, TrainingInterrupted
    from ..trainer.monitor.events import fanout
    from ..trainer.run import Run
    from ..trainer.training.identity import RunIdentity
    from ..trainer.training.loop import Hooks
    from .paths import runs_root, sanitize_name
    from .preview_node import parse_prompts, training_preview

    identity = RunIdentity.of(host, cfg, latents.latents.samples, latents.dataset_config)
    run_dir = runs_root() / f"{sanitize_name(run_name)}-{identity.key}"
    if resume_from.strip():
        candidate = Path(resume_from.strip())
        run_dir = candidate if candidate.is_absolute() else runs_root() / candidate

    bar = comfy.utils.ProgressBar(cfg.steps)

    def on_step(step, loss, lr):
        host.check_interrupt()  # before the bar: its hook would raise ComfyUI's exception and skip our state save
        bar.update_absolute(step, cfg.steps)

    hooks = Hooks(on_step=on_step)
    prompts = parse_prompts(preview_prompts)
    if prompts and preview_every > 0:
        if host.vae is None:
            raise TrainingError("Train LoRA: preview prompts are set but no VAE is connected; connect the VAE "
                                "(or set preview_every to 0)")
        size = latents.bucket_config.resolutions[0]
        settings = {"steps": 20, "cfg": 7.0, "seed": cfg.seed, "width": size, "height": size}
        hooks.preview = lambda step, network: training_preview(host, network, prompts, [0.0, 1.0], run_dir, step,
                                                               settings)
        hooks.preview_every = preview_every

    run = Run(host, latents.latents, cfg, run_dir=run_dir, dataset_cfg=latents.dataset_config,
              bucket_cfg=latents.bucket_config, cache_dir=latents.cache_dir, image_count=latents.image_count,
              title=run_dir.name, trigger_phrase=latents.dataset_config.trigger_word,
              allow_over_memory=allow_over_memory, emit=fanout(_send), node=str(node_id), hooks=hooks,
              identity=identity)
    try:
        return run.execute()
    except TrainingInterrupted:
        # The resumable state is saved; now report ComfyUI's own interruption (and clear its flag).
        mm.throw_exception_if_processing_interrupted()
        raise mm.InterruptProcessingException()
