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
    """To every open page (sid None broadcasts): a second tab, or a page opened mid-run, shows the run too. Each
    page matches the event to its node by the node id and the run id (web/loralab_core.js eventBelongsTo)."""
    from server import PromptServer

    PromptServer.instance.send_sync(EVENT, payload, None)


class TrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import comfy.samplers

        from .preview_settings import DEFAULT

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
                io.Boolean.Input("numbered_loras", default=False, optional=True, tooltip="Also write the LoRA "
                                 "of every save_every step and of the last step to models/loras/loralab/<run "
                                 "folder>/<run_name>-<step>.safetensors, so LoraLoader (and Compare LoRAs) can use "
                                 "each checkpoint."),
                io.Boolean.Input("tensorboard", default=False, optional=True, tooltip="Log loss, its EMA, "
                                 "learning rate, gradient norm, memory and the previews to the run folder's "
                                 "tensorboard/ (needs: pip install tensorboard). View: tensorboard --logdir "
                                 "output/loralab/runs"),
                io.String.Input("preview_negative", multiline=True, default="", optional=True,
                                tooltip="Negative prompt for the previews."),
                io.Int.Input("preview_steps", default=0, min=0, max=200, optional=True,
                             tooltip="Sampling steps of a preview (0 = the model family's default: 20 for SD1.5 "
                             "and SDXL)."),
                io.Float.Input("preview_cfg", default=0.0, min=0.0, max=30.0, step=0.5, optional=True,
                               tooltip="Classifier-free guidance of the previews (0 = the family's default: 7 for "
                               "SD1.5 and SDXL, 1 for guidance-distilled Flux)."),
                io.Combo.Input("preview_sampler", options=[DEFAULT] + list(comfy.samplers.KSampler.SAMPLERS),
                               default=DEFAULT, optional=True, tooltip="Sampler of the previews, as in KSampler "
                               "('default': the family's, euler for SD1.5 and SDXL)."),
                io.Combo.Input("preview_scheduler", options=[DEFAULT] + list(comfy.samplers.KSampler.SCHEDULERS),
                               default=DEFAULT, optional=True, tooltip="Scheduler of the previews, as in KSampler "
                               "('default': the family's, normal for SD1.5 and SDXL)."),
                io.Int.Input("preview_width", default=0, min=0, max=4096, step=8, optional=True,
                             tooltip="Preview width in pixels (0 = the training resolution)."),
                io.Int.Input("preview_height", default=0, min=0, max=4096, step=8, optional=True,
                             tooltip="Preview height in pixels (0 = the training resolution)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The input model with the trained LoRA applied."),
                io.Clip.Output(display_name="clip", tooltip="The CLIP, with text-encoder adapters if trained."),
                io.LoraModel.Output(display_name="lora", tooltip="The LoRA (kohya keys): connect to Save LoRA."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per step."),
                io.Image.Output(display_name="loss_plot", tooltip="The loss curve as an image."),
                io.String.Output(display_name="run_folder", tooltip="The run folder (its name under "
                                 "output/loralab/runs): connect to Compare LoRAs' run_folder to compare the "
                                 "numbered LoRAs of this run."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, latents, config, steps, batch_size, seed, save_every, run_name, vae=None,
                preview_prompts="", preview_every=0, resume_from="", allow_over_memory=False,
                model_weights="trained", numbered_loras=False, tensorboard=False, **preview) -> io.NodeOutput:
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
                      preview_every, allow_over_memory, preview=preview, numbered_loras=numbered_loras,
                      tensorboard=tensorboard)
        ema = LoraStateDict(result.ema, result.metadata) if result.ema is not None else None
        lora = LoraStateDict(result.lora, result.metadata, ema=ema)
        applied = ema if model_weights == "ema" else lora
        model_out, clip_out = comfy.sd.load_lora_for_models(model, clip, applied, 1.0, 1.0)
        plot = image_to_tensor(render_loss_plot(read_history(result.run_dir), title=result.run_dir.name))
        text = result.summary() + (f"\nMODEL output: {model_weights} weights" if ema is not None else "")
        if result.estimate:
            text += "\n" + result.estimate
        from .paths import runs_root

        folder = result.run_dir.name if result.run_dir.parent == runs_root() else str(result.run_dir)
        return io.NodeOutput(model_out, clip_out, lora, {"loss": list(result.losses)}, plot, folder,
                             ui={"text": [text], "loralab_run": [result.run_dir.name]})


def _run(host, latents, cfg, run_name: str, resume_from: str, node_id, preview_prompts: str, preview_every: int,
         allow_over_memory: bool, preview: dict | None = None, numbered_loras: bool = False,
         tensorboard: bool = False):
    """The engine's Run, with ComfyUI's progress bar, Stop, live events and previews wired in. ``preview``: the
    node's preview_* inputs (``preview_settings.py``); ``numbered_loras``: write each checkpoint to models/loras."""
    import comfy.model_management as mm
    import comfy.utils

    from ..trainer.errors import ConfigError, TrainingError, TrainingInterrupted
    from ..trainer.monitor.events import fanout
    from ..trainer.run import Run
    from ..trainer.training.identity import RunIdentity
    from ..trainer.training.loop import Hooks
    from ..trainer.training.schedules import resolve_timestep_sampling
    from ..trainer.files.numbered import NumberedLoRAs
    from .paths import numbered_lora_folder, refresh_lora_list, runs_root, sanitize_name
    from .preview_node import parse_prompts, training_preview
    from .preview_settings import preview_settings
    from .widget_names import comfy_naming

    cfg = resolve_timestep_sampling(cfg, host.schedule)  # "auto" names the family's recipe: same run either way
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
        settings = preview_settings(host.family, seed=cfg.seed, resolution=latents.bucket_config.resolutions[0],
                                    **{k.removeprefix("preview_"): v for k, v in (preview or {}).items()})
        hooks.preview = lambda step, network: training_preview(host, network, prompts, [0.0, 1.0], run_dir, step,
                                                               settings)
        hooks.preview_every = preview_every

    run = Run(host, latents.latents, cfg, run_dir=run_dir, dataset_cfg=latents.dataset_config,
              bucket_cfg=latents.bucket_config, cache_dir=latents.cache_dir, image_count=latents.image_count,
              title=run_dir.name, trigger_phrase=latents.dataset_config.trigger_word,
              allow_over_memory=allow_over_memory, emit=fanout(_send), node=str(node_id), hooks=hooks,
              identity=identity, naming=comfy_naming(), tensorboard=tensorboard,
              numbered=NumberedLoRAs(numbered_lora_folder(run_dir.name), sanitize_name(run_name),
                                     cfg.output_dtype) if numbered_loras else None)
    try:
        result = run.execute()
        if numbered_loras:
            refresh_lora_list()  # LoraLoader lists the new checkpoints without a restart
        return result
    except TrainingInterrupted:
        # The resumable state is saved; now report ComfyUI's own interruption (and clear its flag).
        mm.throw_exception_if_processing_interrupted()
        raise mm.InterruptProcessingException()
    except (TrainingError, ConfigError) as e:
        raise in_node_words(e, run.naming) from None


def in_node_words(error: Exception, naming) -> Exception:
    """The engine's error with the config keys it names (``optimizer.name``) in the node's words ("Configure LoRA's
    optimizer"); the same exception when nothing changes."""
    text = naming.text(str(error))
    if text == str(error):
        return error
    renamed = type(error)(text)
    renamed.__dict__.update(error.__dict__)  # e.g. the pre-flight problems
    return renamed.with_traceback(error.__traceback__)
