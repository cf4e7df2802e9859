"""Train LoRA: trains adapters on the MODEL ComfyUI already loaded and returns it with the LoRA applied.

A finished run is kept under a key of everything that determines its result (model, data, settings), so
re-queueing the same graph after ComfyUI evicted its cache reuses it. Stop saves a resumable state; queueing the
same graph again continues from it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from comfy_api.latest import io

from .types import CATEGORY, Latents, TrainConfig

EVENT = "loralab.progress"
FINAL_LORA = "final.safetensors"


def run_key(host, latents_value, config) -> str:
    """Identity of a training run: same key → same result, so a finished run can be reused."""
    digest = hashlib.sha256()
    digest.update(host.model_id.encode())
    digest.update(host.text_encoder_id.encode())
    digest.update(config.digest().encode())
    init_from = Path(config.network.init_from) if config.network.init_from else None
    if init_from is not None and init_from.is_file():  # the LoRA continued from: its content, not only its name
        with open(init_from, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    digest.update(json.dumps(dataclasses.asdict(latents_value.dataset_config), sort_keys=True).encode())
    for s in latents_value.latents.samples:
        digest.update(f"{s.content_hash}|{s.bucket}|{s.crop_top_left}|{s.caption}|{s.repeats}|{s.resolution}".encode())
        digest.update(s.latent.float().numpy().tobytes())  # covers the VAE that encoded it
    return digest.hexdigest()[:12]


class LoraStateDict(dict):
    """A kohya-keyed LoRA state dict (what core nodes expect on LORA_MODEL) that also carries its metadata."""

    def __init__(self, tensors, metadata=None):
        super().__init__(tensors)
        self.metadata = dict(metadata or {})


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
                preview_prompts="", preview_every=0, resume_from="", allow_over_memory=False) -> io.NodeOutput:
        import comfy.sd

        from ..trainer.files.lora_file import load_lora
        from ..trainer.monitor.plot import image_to_tensor, render_loss_plot
        from ..trainer.monitor.runlog import read_estimate, read_history
        from .comfy_host import ComfyHost
        from .paths import runs_root, sanitize_name

        cfg = dataclasses.replace(config, steps=steps, batch_size=batch_size, seed=seed, save_every=save_every)
        host = ComfyHost(model.clone(), clip, vae)
        run_dir = runs_root() / f"{sanitize_name(run_name)}-{run_key(host, latents, cfg)}"
        final = run_dir / FINAL_LORA
        if final.is_file():
            lora_sd, metadata = load_lora(final)
            losses = read_history(run_dir).get("loss", [])
        else:
            lora_sd, metadata, losses = _train(host, latents, cfg, run_dir, resume_from, cls.hidden.unique_id,
                                     preview_prompts, preview_every, allow_over_memory)
        lora = LoraStateDict(lora_sd, metadata)
        model_out, clip_out = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
        plot = image_to_tensor(render_loss_plot(read_history(run_dir), title=run_dir.name))
        text = f"run: {run_dir}\nsteps: {len(losses)}" + (f"\nfinal loss: {losses[-1]:.4f}" if losses else "")
        estimate = read_estimate(run_dir)
        if estimate:
            text += "\n" + estimate
        return io.NodeOutput(model_out, clip_out, lora, {"loss": list(losses)}, plot,
                             ui={"text": [text], "loralab_run": [run_dir.name]})


def _train(host, latents, cfg, run_dir: Path, resume_from: str, node_id, preview_prompts: str, preview_every: int,
           allow_over_memory: bool):
    import comfy.model_management as mm
    import comfy.utils

    from ..trainer.errors import TrainingInterrupted
    from ..trainer.files.atomic import write_text
    from ..trainer.files.lora_file import build_metadata, save_lora
    from ..trainer.monitor.events import ProgressReporter, fanout
    from ..trainer.monitor.runlog import ESTIMATE_FILE, RunLog
    from ..trainer.preflight.checks import preflight, raise_problems
    from ..trainer.preflight.memory import check_fits, measured_peak, oom_report
    from ..trainer.training.loop import Hooks, train
    from ..trainer.training.state import latest_snapshot
    from .estimate import estimate_for, keeps_text_encoder
    from .paths import runs_root
    from .preview_node import parse_prompts, training_preview

    if resume_from.strip():
        candidate = Path(resume_from.strip())
        run_dir = candidate if candidate.is_absolute() else runs_root() / candidate
    resume = latest_snapshot(run_dir) is not None
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.json", json.dumps({"train": cfg.to_dict(), "bucket": dataclasses.asdict(
        latents.bucket_config), "dataset": dataclasses.asdict(latents.dataset_config)}, indent=1))

    bar = comfy.utils.ProgressBar(cfg.steps)
    prompts = parse_prompts(preview_prompts)

    def on_step(step, loss, lr):
        host.check_interrupt()  # before the bar: its hook would raise ComfyUI's exception and skip our state save
        bar.update_absolute(step, cfg.steps)

    hooks = Hooks(on_step=on_step)
    if prompts and preview_every > 0:
        if host.vae is None:
            from ..trainer.errors import TrainingError

            raise TrainingError("Train LoRA: preview prompts are set but no VAE is connected; connect the VAE "
                                "(or set preview_every to 0)")
        size = latents.bucket_config.resolutions[0]
        settings = {"steps": 20, "cfg": 7.0, "seed": cfg.seed, "width": size, "height": size}
        hooks.preview = lambda step, network: training_preview(host, network, prompts, [0.0, 1.0], run_dir, step,
                                                               settings)
        hooks.preview_every = preview_every

    # Pre-flight: every input check at once, then the memory estimate (refuses to start when it cannot fit).
    # One training session (model loaded, autograd-ready weights) serves the estimate's trace and the run.
    keep_te = keeps_text_encoder(cfg, latents)
    samples = latents.latents.samples
    warnings = raise_problems(preflight(
        host, cfg, None, latents.bucket_config, latent_channels_from_vae=samples[0].latent.shape[0],
        output_dir=run_dir.parent, cache_dir=latents.cache_dir, resume_dir=run_dir if resume else None))
    was_training = getattr(mm, "in_training", None)
    if was_training is not None:
        mm.in_training = True
    try:
        with host.training_session(keep_te, cfg.network.train_text_encoder):
            estimate = estimate_for(host, cfg, latents, cfg.batch_size, keep_te)
            fit_note = check_fits(estimate, allow_over_memory)
            notes = [str(w) for w in warnings] + ([fit_note] if fit_note else [])
            hooks.oom_report = lambda step: oom_report(estimate, measured_peak(host), step)
            write_text(run_dir / ESTIMATE_FILE, "\n".join([estimate.to_text()] + notes) + "\n")
            with RunLog(run_dir) as runlog:
                reporter = ProgressReporter(fanout(_send, runlog.write_latest), node=str(node_id), run=run_dir.name,
                                            total=cfg.steps, estimate=estimate.comparable_peak)
                reporter.report("encoding", step=0, mem=host.memory, message="; ".join([estimate.summary()] + notes))
                result = train(host, latents.latents, cfg, run_dir, dataset_cfg=latents.dataset_config,
                               text_cache_dir=latents.cache_dir / "text", resume=resume, reporter=reporter,
                               hooks=hooks, runlog=runlog)
    except TrainingInterrupted:
        # The resumable state is saved; now report ComfyUI's own interruption (and clear its flag).
        mm.throw_exception_if_processing_interrupted()
        raise mm.InterruptProcessingException()
    finally:
        if was_training is not None:
            mm.in_training = was_training
    metadata = build_metadata(cfg, family=host.family, prediction=host.schedule.prediction,
                              resolution=max(latents.bucket_config.resolutions), title=run_dir.name,
                              trigger_phrase=latents.dataset_config.trigger_word, notes="",
                              extra={"ss_num_train_images": str(latents.image_count)})
    state = result.network.kohya_state_dict()
    save_lora(run_dir / FINAL_LORA, state, metadata, dtype="fp32")
    return state, metadata, result.losses
