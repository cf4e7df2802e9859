"""The training loop. Reads top to bottom: set up, (resume), then one optimizer step per iteration.

Every random draw comes from generators whose state is saved in each snapshot, so an interrupted-and-resumed run
repeats the uninterrupted one exactly on the CPU. The input model is never changed: adapters attach as forward
hooks inside `network.attached()` and are removed in `finally`, whatever happens.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..adapters.network import LoRANetwork
from ..config import DatasetConfig, TrainConfig
from ..data.batching import BatchSampler
from ..data.captions import build_caption
from ..data.text import TextEmbeddings
from ..errors import TrainingError, TrainingInterrupted
from ..hosts.base import Conditioning
from . import objectives
from .ema import AdapterEMA
from .optim import build_lr_scheduler, build_optimizer, clip_grad_norm
from .state import RngState, check_compatible, latest_snapshot, load_snapshot, save_snapshot

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    network: LoRANetwork
    step: int
    losses: list[float]
    run_dir: Path
    ema: Optional[AdapterEMA] = None
    status: str = "done"  # done | stopped | error
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Hooks:
    """Optional callbacks from the loop to its caller (the ComfyUI node or the CLI)."""

    on_step: Optional[Callable[[int, float, float], None]] = None  # (step, loss, lr) after each optimizer step
    on_save: Optional[Callable[[int, Path], None]] = None
    preview: Optional[Callable[[int, LoRANetwork], Optional[str]]] = None  # returns a preview file or None
    preview_every: int = 0
    oom_report: Optional[Callable[[int], str]] = None  # (step) -> estimate vs what happened, for the OOM message


def resume_digest(cfg: TrainConfig) -> str:
    """Settings that must match for a resume; operational ones (how often to save) may change."""
    import hashlib

    data = cfg.to_dict()
    for key in ("save_every", "keep_last", "output_dtype"):
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=list).encode()).hexdigest()[:16]


def train(host, latents, cfg: TrainConfig, run_dir: str | Path, **kwargs) -> TrainResult:
    """Train adapters on `host` for `cfg.steps` optimizer steps; see `_train` for the keyword arguments."""
    # ComfyUI runs nodes under inference_mode: adapters created there could never train, so leave it first.
    with torch.inference_mode(False), torch.enable_grad():
        return _train(host, latents, cfg, run_dir, **kwargs)


def _train(host, latents, cfg: TrainConfig, run_dir: str | Path, *, dataset_cfg: Optional[DatasetConfig] = None,
           text_cache_dir: Optional[str | Path] = None, resume: bool = False, reporter=None,
           hooks: Optional[Hooks] = None, runlog=None) -> TrainResult:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dataset_cfg = dataset_cfg or DatasetConfig()
    hooks = hooks or Hooks()
    device = host.device
    if not latents.samples:
        raise TrainingError("no cached latents to train on: the dataset has no usable image")

    # --- the adapter network, optimizer, schedule -----------------------------------------------------------
    net_cfg = cfg.network
    targets = host.adapter_targets(net_cfg.targets, net_cfg.conv_rank > 0, net_cfg.train_text_encoder)
    network = LoRANetwork(targets, net_cfg, device=device, generator=torch.Generator().manual_seed(cfg.seed))
    if net_cfg.init_from:
        from ..files.lora_file import load_lora

        network.load_kohya_state_dict(load_lora(net_cfg.init_from)[0])
    opt_cfg = cfg.optimizer
    te_lr = opt_cfg.text_encoder_lr if opt_cfg.text_encoder_lr is not None else opt_cfg.learning_rate
    optimizer = build_optimizer(network.param_groups(opt_cfg.learning_rate, te_lr), opt_cfg, device)
    scheduler = build_lr_scheduler(optimizer, opt_cfg, cfg.steps)
    ema = AdapterEMA(network.parameters(), cfg.ema_decay) if cfg.ema_decay > 0 else None
    autocast_dtype = AUTOCAST_DTYPES.get(cfg.mixed_precision)
    scaler = torch.amp.GradScaler(device.type) if cfg.mixed_precision == "fp16" else None

    torch.manual_seed(cfg.seed)  # adapter dropout draws from the global RNG (saved and restored on resume)
    sampler = BatchSampler(latents.samples, cfg.batch_size, cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    caption_rng = random.Random(cfg.seed)
    text = TextEmbeddings(host, cfg.clip_skip, text_cache_dir, trainable=net_cfg.train_text_encoder)
    losses: list[float] = []
    step = 0

    digest = resume_digest(cfg)
    meta = {"config_digest": digest, "model_id": getattr(host, "model_id", ""), "family": host.family}
    if resume:
        snapshot = latest_snapshot(run_dir)
        if snapshot is None:
            raise TrainingError(f"nothing to resume in '{run_dir}': it has no saved state (state/step_*)")
        adapters, training, saved_meta = load_snapshot(snapshot)
        check_compatible(saved_meta, config_digest=digest, model_id=meta["model_id"], path=snapshot)
        network.load_kohya_state_dict(adapters)
        optimizer.load_state_dict(training["optimizer"])
        scheduler.load_state_dict(training["scheduler"])
        sampler.load_state_dict(training["sampler"])
        if ema is not None and training.get("ema") is not None:
            ema.load_state_dict(training["ema"])
        if scaler is not None and training.get("scaler") is not None:
            scaler.load_state_dict(training["scaler"])
        RngState(**training["rng"]).restore(generator, caption_rng)
        step = int(saved_meta["step"])
        losses = list(training.get("losses", []))[:step]
        if runlog is not None:
            runlog.truncate_after(step)
            runlog.mark(step, "resume")
        if reporter is not None:
            reporter.resume(step, losses)  # the live EMA continues the curve drawn from disk

    def snapshot_state(at_step: int, rng: RngState) -> Path:
        training = {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng.to_dict(), "losses": losses[:at_step],
        }
        path = save_snapshot(run_dir, at_step, network.kohya_state_dict(torch.float32), training, meta, cfg.keep_last)
        if runlog is not None:
            runlog.mark(at_step, "save", str(path.relative_to(run_dir)))
        if hooks.on_save:
            hooks.on_save(at_step, path)
        return path

    def report(phase: str, lr=None, **values):
        if reporter is not None:
            lr = scheduler.get_last_lr()[0] if lr is None else lr
            reporter.report(phase, step=step, lr=lr, mem=host.memory, **values)

    # --- text conditioning is encoded once, up front (cached on disk by caption text) ----------------------
    report("encoding", message="encoding captions")
    text.prefetch([s.caption for s in latents.samples] + ([""] if dataset_cfg.caption_dropout > 0 else []))

    # --- the loop -------------------------------------------------------------------------------------------
    rng_at_step_start = RngState.capture(generator, caption_rng)
    with contextlib.ExitStack() as stack:
        if hasattr(host, "training_session"):  # e.g. ComfyUI: evict other models, load this one fully
            keep_te = net_cfg.train_text_encoder or dataset_cfg.shuffle_captions or dataset_cfg.caption_dropout > 0
            stack.enter_context(host.training_session(keep_te, net_cfg.train_text_encoder))
        stack.enter_context(network.attached())
        stack.enter_context(host.gradient_checkpointing(cfg.gradient_checkpointing))
        network.train()
        try:
            while step < cfg.steps:
                host.check_interrupt()
                step_loss = 0.0
                for _ in range(opt_cfg.grad_accumulation):
                    batch = [latents.samples[i] for i in sampler.next_batch()]
                    x0, cond = collate(host, batch, text, dataset_cfg, caption_rng, generator, device)
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        loss = compute_loss(host, x0, cond, cfg, generator)
                    loss_value = float(loss.detach())
                    if not math.isfinite(loss_value):
                        # Keep the last good state (the one this step started from) and name the step.
                        path = snapshot_state(step, rng_at_step_start)
                        raise TrainingError(
                            f"loss became {loss_value} at step {step + 1}; training stopped. The state before that "
                            f"step is saved in '{path}'. Lower the learning rate, use bf16 instead of fp16, or "
                            "check the dataset for broken images")
                    scaled = loss / opt_cfg.grad_accumulation
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    step_loss += loss_value / opt_cfg.grad_accumulation
                if scaler is not None:
                    scaler.unscale_(optimizer)
                clip_grad_norm(network.parameters(), opt_cfg.max_grad_norm)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update()
                step += 1
                rng_at_step_start = RngState.capture(generator, caption_rng)  # = the state step+1 starts from
                losses.append(step_loss)
                if runlog is not None:
                    runlog.log(step, step_loss, lr)
                if hooks.on_step:
                    hooks.on_step(step, step_loss, lr)
                report("training", loss=step_loss, lr=lr)
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    report("saving", loss=step_loss)
                    snapshot_state(step, rng_at_step_start)
                if hooks.preview and hooks.preview_every and step % hooks.preview_every == 0:
                    report("preview", loss=step_loss)
                    _run_preview(hooks, step, network, runlog, reporter)
        except (TrainingInterrupted, KeyboardInterrupt):
            # Mid-step work is discarded: the adapters are still those of `step`, and so are the saved RNG states.
            snapshot_state(step, rng_at_step_start)
            report("stopped", message=f"stopped at step {step}; resumable state saved")
            raise
        except torch.OutOfMemoryError as e:
            optimizer.zero_grad(set_to_none=True)  # free what the failed step held before writing the state
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            path = snapshot_state(step, rng_at_step_start)
            report("error", message="out of memory")
            advice = (hooks.oom_report(step + 1) if hooks.oom_report else "Lower the batch size, resolution or rank, "
                      "turn on gradient checkpointing, or use an 8-bit optimizer.")
            raise TrainingError(f"out of memory at step {step + 1}. A resumable state is saved in '{path}'. "
                                f"{advice}") from e
    snapshot_state(step, rng_at_step_start)
    report("done", loss=losses[-1] if losses else None)
    return TrainResult(network=network, step=step, losses=losses, run_dir=run_dir, ema=ema)


def collate(host, batch, text, dataset_cfg, caption_rng, generator, device) -> tuple[torch.Tensor, Conditioning]:
    """Stack one bucket's samples, pick flips, build captions, and look up each sample's own conditioning."""
    flips = torch.rand(len(batch), generator=generator) < 0.5
    latents, size_ids = [], []
    for sample, flip in zip(batch, flips.tolist()):
        use_flip = flip and sample.latent_flipped is not None
        latents.append(sample.latent_flipped if use_flip else sample.latent)
        top, left = sample.crop_top_left_flipped if use_flip else sample.crop_top_left
        bucket_w, bucket_h = sample.bucket
        size_ids.append([*sample.original_size, top, left, bucket_h, bucket_w])
    x0 = host.scale_latents(torch.stack(latents).to(device, torch.float32))
    captions = [build_caption(sample.caption, dataset_cfg, caption_rng) for sample in batch]
    context, pooled = text(captions)
    size = torch.tensor(size_ids, dtype=torch.float32, device=device) if host.family == "sdxl" else None
    return x0, Conditioning(context.to(device), pooled.to(device) if pooled is not None else None, size)


def compute_loss(host, x0: torch.Tensor, cond: Conditioning, cfg: TrainConfig, generator: torch.Generator,
                 timesteps: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Loss in the model's own parameterization (eps / v / flow velocity), with the configured weighting."""
    schedule, obj = host.schedule, cfg.objective
    if timesteps is None:
        timesteps = schedule.sample_timesteps(x0.shape[0], generator, obj).to(x0.device)
    if noise is None:
        noise = objectives.sample_noise(x0, generator, obj)
    noisy = schedule.add_noise(x0, noise, timesteps)
    prediction = host.predict(noisy.to(host.dtype), timesteps, cond.to(dtype=host.dtype)).float()
    target = schedule.target(x0, noise, timesteps)
    weights = objectives.loss_weights(schedule, timesteps, obj)
    return objectives.loss(prediction, target, weights, obj)


def _run_preview(hooks: Hooks, step: int, network: LoRANetwork, runlog, reporter) -> None:
    from ..monitor.events import preview_url

    network.eval()
    try:
        with torch.no_grad():
            path = hooks.preview(step, network)
        if path and runlog is not None:
            runlog.mark(step, "preview", Path(path).name)
        if path and reporter is not None:
            reporter.preview(step, preview_url(reporter.run, Path(path).name))
    finally:
        network.train()


@torch.no_grad()
def fixed_grid_loss(host, latents, cfg: TrainConfig, timesteps: list[int], seed: int = 1234) -> float:
    """Mean loss over every sample at a fixed grid of timesteps with fixed noise: a low-variance progress measure."""
    text = TextEmbeddings(host, cfg.clip_skip, None, trainable=False)
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for sample in latents.samples:
        x0, cond = collate(host, [sample], text, DatasetConfig(), random.Random(seed), generator, host.device)
        x0 = host.scale_latents(sample.latent.unsqueeze(0).to(host.device, torch.float32))
        for t in timesteps:
            noise = torch.randn(x0.shape, generator=generator).to(x0.device)
            ts = torch.full((1,), t, dtype=torch.long, device=x0.device)
            total += float(compute_loss(host, x0, cond, cfg, generator, timesteps=ts, noise=noise))
            count += 1
    return total / max(count, 1)
