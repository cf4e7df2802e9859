"""The training loop. Reads top to bottom: build the parts, (resume), then one optimizer step per iteration.

Every random draw is keyed by where it happens in the run: each sample's flip, caption variation, timestep and noise
come from generators seeded by its place in the batch order (``data/batching.py`` ``Draw``), and adapter dropout
from the global RNG reseeded per micro-batch the same way. A snapshot therefore only needs the batch position, an
interrupted-and-resumed run repeats the uninterrupted one exactly on the CPU, and several processes sharing a batch
(``distributed.py``) draw what one process with the whole batch would. The input model is never changed: adapters
attach as forward hooks inside ``network.attached()`` and are removed in ``finally``, whatever happens. The
precision rule is in ``precision.py``.
"""
from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..adapters.network import LoRANetwork
from ..config import DatasetConfig, TrainConfig
from ..data.batching import BatchSampler
from ..data.captions import build_caption
from ..data.text import TextEmbeddings, padded_rows
from ..errors import TrainingError, TrainingInterrupted
from ..hosts.base import Conditioning
from . import distributed, objectives
from .ema import AdapterEMA
from .identity import RunIdentity
from .optim import build_lr_scheduler, build_optimizer, clip_grad_norm, sync_lr
from .precision import Precision, resolve_precision
from .schedules import resolve_timestep_sampling
from .state import check_resumable, latest_snapshot, load_snapshot, save_snapshot, snapshot_dir


@dataclass
class Hooks:
    """Optional callbacks from the loop to its caller (the ComfyUI node or the CLI)."""

    on_step: Optional[Callable[[int, float, float], None]] = None  # (step, loss, lr) after each optimizer step
    on_save: Optional[Callable[[int, Path], None]] = None
    preview: Optional[Callable[[int, LoRANetwork], Optional[str]]] = None  # returns a preview file or None
    preview_every: int = 0
    oom_report: Optional[Callable[[int], str]] = None  # (step) -> estimate vs what happened, for the OOM message
    on_metrics: Optional[Callable[[int, dict], None]] = None  # (step, {loss, lr, grad_norm}) after each step


@dataclass
class TrainResult:
    network: LoRANetwork
    step: int
    losses: list[float]
    run_dir: Path
    ema: Optional[AdapterEMA] = None
    notes: list[str] = field(default_factory=list)  # e.g. "resuming onto a changed dataset"


@dataclass
class TrainingParts:
    """Everything an optimizer step changes, i.e. what a snapshot saves and a resume restores."""

    network: LoRANetwork
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Optional[AdapterEMA]
    scaler: Optional[torch.amp.GradScaler]
    sampler: BatchSampler  # global batches (batch_size x processes); its position is all the randomness state
    text: TextEmbeddings
    precision: Precision
    grad_norm: float = 0.0  # of the last optimizer step, before clipping (for logging)


@dataclass
class SampleRng:
    """One sample's own random streams at one place in the run (see the module docstring)."""

    torch: torch.Generator  # flip, timestep, noise
    captions: random.Random  # caption dropout, tag shuffle

    @classmethod
    def keyed(cls, seed: int) -> "SampleRng":
        return cls(torch.Generator().manual_seed(seed), random.Random(seed))


class NonFiniteLoss(Exception):
    def __init__(self, value: float):
        super().__init__(value)
        self.value = value


def build_parts(host, latents, cfg: TrainConfig, precision: Precision, text_cache_dir) -> TrainingParts:
    net_cfg, opt_cfg = cfg.network, cfg.optimizer
    targets = host.adapter_targets(net_cfg.targets, net_cfg.conv_rank > 0, net_cfg.train_text_encoder)
    network = LoRANetwork(targets, net_cfg, device=host.device, generator=torch.Generator().manual_seed(cfg.seed))
    if net_cfg.init_from:
        from ..files.lora_file import load_lora

        network.load_kohya_state_dict(load_lora(net_cfg.init_from)[0])
    te_lr = opt_cfg.text_encoder_lr if opt_cfg.text_encoder_lr is not None else opt_cfg.learning_rate
    groups = network.param_groups(opt_cfg.learning_rate, te_lr, loraplus_ratio=opt_cfg.loraplus_lr_ratio)
    optimizer = build_optimizer(groups, opt_cfg, host.device)
    distributed.broadcast_parameters(network.parameters())  # every process starts from rank 0's adapters
    return TrainingParts(
        network=network, optimizer=optimizer, scheduler=build_lr_scheduler(optimizer, opt_cfg, cfg.steps),
        ema=AdapterEMA(network.parameters(), cfg.ema_decay) if cfg.ema_decay > 0 else None,
        scaler=precision.new_grad_scaler(host.device),
        sampler=BatchSampler(latents.samples, distributed.global_batch_size(cfg.batch_size), cfg.seed),
        text=TextEmbeddings(host, cfg.clip_skip, text_cache_dir, trainable=net_cfg.train_text_encoder),
        precision=precision,
    )


def train_step(host, parts: TrainingParts, samples, cfg: TrainConfig, dataset_cfg: DatasetConfig) -> tuple[float, float]:
    """One optimizer step over ``grad_accumulation`` micro-batches; returns (mean loss, learning rate used).

    Each micro-batch is one global batch; this process trains its share of it (all of it on one process) and weighs
    its loss by that share, so the summed gradients are those of the mean over the whole batch.
    Raises :class:`NonFiniteLoss` before any weight changes when the step's loss is NaN or infinite."""
    accumulation = cfg.optimizer.grad_accumulation
    step_loss = 0.0
    for _ in range(accumulation):
        draws = parts.sampler.next_draws()
        mine = distributed.share(draws, cfg.batch_size)
        if not mine:
            continue  # a short bucket batch left nothing for this process
        rngs = [SampleRng.keyed(d.seed) for d in mine]
        torch.manual_seed(mine[0].seed)  # adapter dropout: keyed by this micro-batch's first place
        batch = [samples[d.index] for d in mine]
        x0, cond = collate(host, batch, parts.text, dataset_cfg, rngs, host.device)
        timesteps, noise = draw_noise(host.schedule, x0, rngs, cfg.objective)
        with parts.precision.autocast_context(host.device):
            loss = compute_loss(host, x0, cond, cfg, None, timesteps=timesteps, noise=noise,
                                sample_weights=per_sample_weights(batch))
        share = len(mine) / (len(draws) * accumulation)
        weighted = loss * share
        (parts.scaler.scale(weighted) if parts.scaler is not None else weighted).backward()
        step_loss += float(loss.detach()) * share
    step_loss = distributed.reduce_step(parts.network.parameters(), step_loss)  # one process: unchanged
    if not math.isfinite(step_loss):
        raise NonFiniteLoss(step_loss)
    if parts.scaler is not None:
        parts.scaler.unscale_(parts.optimizer)  # clip the true gradients, not the scaled ones
    parts.grad_norm = clip_grad_norm(parts.network.parameters(), cfg.optimizer.max_grad_norm)
    if parts.scaler is not None:
        parts.scaler.step(parts.optimizer)  # skipped (and the scale lowered) when a gradient overflowed
        parts.scaler.update()
    else:
        parts.optimizer.step()
    lr = parts.scheduler.get_last_lr()[0]
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.ema is not None:
        parts.ema.update()
    return step_loss, lr


def save_state(parts: TrainingParts, run_dir: Path, step: int, losses: list[float], sampler_state: dict, meta: dict,
               keep_last: int) -> Path:
    """``sampler_state``: the batch position ``step`` started from (a failed or stopped step's draws are redone)."""
    training = {
        "optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
        "sampler": sampler_state, "ema": parts.ema.state_dict() if parts.ema is not None else None,
        "scaler": parts.scaler.state_dict() if parts.scaler is not None else None, "losses": losses[:step],
    }
    return save_snapshot(run_dir, step, parts.network.kohya_state_dict(torch.float32), training, meta, keep_last)


def restore_state(parts: TrainingParts, snapshot: Path, identity: RunIdentity) -> tuple[int, list[float], list[str]]:
    """Load a snapshot into the parts; returns (step, losses so far, notes for the user)."""
    adapters, training, saved_meta = load_snapshot(snapshot)
    notes = check_resumable(saved_meta, identity, snapshot)
    parts.network.load_kohya_state_dict(adapters)
    parts.optimizer.load_state_dict(training["optimizer"])
    parts.scheduler.load_state_dict(training["scheduler"])
    sync_lr(parts.scheduler)  # a changed step count reshapes the schedule from here on
    parts.sampler.load_state_dict(training["sampler"])
    if parts.sampler.warning and not notes:
        notes.append(parts.sampler.warning)
    if parts.ema is not None and training.get("ema") is not None:
        parts.ema.load_state_dict(training["ema"])
    if parts.scaler is not None and training.get("scaler") is not None:
        parts.scaler.load_state_dict(training["scaler"])
    distributed.broadcast_parameters(parts.network.parameters())
    saved_processes = int(saved_meta.get("processes", 1))
    if saved_processes != distributed.world_size():
        notes.append(f"resumed on {distributed.world_size()} process(es); the state was saved on {saved_processes} "
                     f"(same global batch of {parts.sampler.batch_size})")
    step = int(saved_meta["step"])
    return step, list(training.get("losses", []))[:step], notes


def train(host, latents, cfg: TrainConfig, run_dir: str | Path, **kwargs) -> TrainResult:
    """Train adapters on ``host`` for ``cfg.steps`` optimizer steps; see ``_train`` for the keyword arguments."""
    # ComfyUI runs nodes under inference_mode: adapters created there could never train, so leave it first.
    with torch.inference_mode(False), torch.enable_grad():
        return _train(host, latents, cfg, run_dir, **kwargs)


def _train(host, latents, cfg: TrainConfig, run_dir: str | Path, *, dataset_cfg: Optional[DatasetConfig] = None,
           text_cache_dir: Optional[str | Path] = None, resume: bool = False, reporter=None,
           hooks: Optional[Hooks] = None, runlog=None, precision: Optional[Precision] = None,
           identity: Optional[RunIdentity] = None) -> TrainResult:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = resolve_timestep_sampling(cfg, host.schedule)
    dataset_cfg = dataset_cfg or DatasetConfig()
    hooks = hooks or Hooks()
    if not latents.samples:
        raise TrainingError("no cached latents to train on: the dataset has no usable image")
    precision = precision or resolve_precision(cfg.mixed_precision, host.dtype, host.device)
    identity = identity or RunIdentity.of(host, cfg, latents.samples, dataset_cfg)
    meta = {"identity": identity.to_dict(), "family": host.family, "processes": distributed.world_size()}

    parts = build_parts(host, latents, cfg, precision, text_cache_dir)
    step, losses, notes = 0, [], []
    if resume:
        snapshot = latest_snapshot(run_dir)
        if snapshot is None:
            raise TrainingError(f"nothing to resume in '{run_dir}': it has no saved state (state/step_*)")
        step, losses, notes = restore_state(parts, snapshot, identity)
        if runlog is not None:
            runlog.truncate_after(step)
            runlog.mark(step, "resume")
        if reporter is not None:
            reporter.resume(step, losses)  # the live EMA continues the curve drawn from disk

    def snapshot(at_step: int, sampler_state: dict) -> Path:
        if not distributed.is_main():
            return snapshot_dir(run_dir, at_step)  # one writer: rank 0, which holds the same state, writes it
        path = save_state(parts, run_dir, at_step, losses, sampler_state, meta, cfg.keep_last)
        if runlog is not None:
            runlog.mark(at_step, "save", str(path.relative_to(run_dir)))
        if hooks.on_save:
            hooks.on_save(at_step, path)
        return path

    def report(phase: str, lr=None, **values):
        if reporter is not None:
            lr = parts.scheduler.get_last_lr()[0] if lr is None else lr
            reporter.report(phase, step=step, lr=lr, mem=host.memory, **values)

    # --- text conditioning is encoded once, up front (cached on disk by caption text) ----------------------
    report("encoding", message="encoding captions")
    with distributed.one_writer_first():  # rank 0 fills the text cache, the others then read it
        parts.text.prefetch([s.caption for s in latents.samples] + ([""] if dataset_cfg.caption_dropout > 0 else []))

    # --- the loop -------------------------------------------------------------------------------------------
    at_step_start = parts.sampler.state_dict()
    with contextlib.ExitStack() as stack:
        keep_te = text_encoder_stays_loaded(cfg, dataset_cfg)
        stack.enter_context(host.training_session(keep_te, cfg.network.train_text_encoder))
        stack.enter_context(parts.network.attached())
        stack.enter_context(host.gradient_checkpointing(cfg.gradient_checkpointing))
        stack.enter_context(distributed.stop_after_step())
        parts.network.train()
        try:
            while step < cfg.steps:
                host.check_interrupt()
                if distributed.stop_agreed():  # a launcher's SIGINT/SIGTERM: every process stops here
                    raise TrainingInterrupted()
                try:
                    step_loss, lr = train_step(host, parts, latents.samples, cfg, dataset_cfg)
                except NonFiniteLoss as e:
                    # Keep the last good state (the one this step started from) and name the step.
                    path = snapshot(step, at_step_start)
                    raise TrainingError(
                        f"loss became {e.value} at step {step + 1}; training stopped. The state before that step is "
                        f"saved in '{path}'. Lower the learning rate, use bf16 instead of fp16, or check the "
                        "dataset for broken images") from None
                step += 1
                at_step_start = parts.sampler.state_dict()  # what step+1 starts from
                losses.append(step_loss)
                if runlog is not None:
                    runlog.log(step, step_loss, lr)
                if hooks.on_step:
                    hooks.on_step(step, step_loss, lr)
                if hooks.on_metrics:
                    hooks.on_metrics(step, {"loss": step_loss, "lr": lr, "grad_norm": parts.grad_norm})
                report("training", loss=step_loss, lr=lr)
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    report("saving", loss=step_loss)
                    snapshot(step, at_step_start)
                if hooks.preview and hooks.preview_every and step % hooks.preview_every == 0:
                    report("preview", loss=step_loss)
                    _run_preview(hooks, step, parts.network, runlog, reporter, host.device)
        except (TrainingInterrupted, KeyboardInterrupt):
            # Mid-step work is discarded: the adapters are still those of `step`, and so is the saved batch position.
            snapshot(step, at_step_start)
            report("stopped", message=f"stopped at step {step}; resumable state saved")
            raise
        except torch.OutOfMemoryError as e:
            parts.optimizer.zero_grad(set_to_none=True)  # free what the failed step held before writing the state
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            path = snapshot(step, at_step_start)
            report("error", message="out of memory")
            advice = (hooks.oom_report(step + 1) if hooks.oom_report else "Lower the batch size, resolution or rank, "
                      "turn on gradient checkpointing, or use an 8-bit optimizer.")
            saved = (f"A resumable state is saved in '{path}'" if distributed.is_main() else
                     f"Process {distributed.rank()} ran out of memory; the last periodic snapshot in '{path.parent}' "
                     "is what can be resumed")
            raise TrainingError(f"out of memory at step {step + 1}. {saved}. {advice}") from e
    snapshot(step, at_step_start)
    report("done", loss=losses[-1] if losses else None)
    return TrainResult(network=parts.network, step=step, losses=losses, run_dir=run_dir, ema=parts.ema, notes=notes)


def text_encoder_stays_loaded(cfg: TrainConfig, dataset_cfg: DatasetConfig) -> bool:
    """The text encoder stays in device memory during training when it is trained, or when captions change per
    step (shuffled tags, dropout) and so are encoded as they are drawn."""
    return bool(cfg.network.train_text_encoder or dataset_cfg.shuffle_captions or dataset_cfg.caption_dropout > 0)


def collate(host, batch, text, dataset_cfg, rngs: Sequence[SampleRng], device) -> tuple[torch.Tensor, Conditioning]:
    """Stack one bucket's samples, pick flips, build captions, and look up each sample's own conditioning; each
    sample draws from its own ``rngs`` entry."""
    latents, size_ids = [], []
    for sample, rng in zip(batch, rngs):
        flip = bool(torch.rand(1, generator=rng.torch) < 0.5)  # drawn even without a flipped latent: same streams
        use_flip = flip and sample.latent_flipped is not None
        latents.append(sample.latent_flipped if use_flip else sample.latent)
        size_ids.append(sample.size_ids(flipped=use_flip))
    x0 = host.scale_latents(torch.stack(latents).to(device, torch.float32))
    captions = [build_caption(sample.caption, getattr(sample, "caption_options", None) or dataset_cfg, rng.captions)
                for sample, rng in zip(batch, rngs)]  # a combined dataset's parts keep their own caption options
    samples = None
    if getattr(host, "per_sample_conditioning", False):  # the DiT families read each sample's own entry
        samples = text.items(captions)
        context, pooled = padded_rows(samples)
    else:
        context, pooled = text(captions)
    size = torch.tensor(size_ids, dtype=torch.float32, device=device) if host.family == "sdxl" else None
    return x0, Conditioning(context.to(device), pooled.to(device) if pooled is not None else None, size,
                            samples).to(device)


def per_sample_weights(batch) -> Optional[torch.Tensor]:
    """Each sample's own loss weight (``loss_weight``: regularisation images train at kohya's prior_loss_weight), or
    None when every weight is 1 (the loss is then exactly the unweighted one)."""
    weights = [float(getattr(sample, "loss_weight", 1.0)) for sample in batch]
    return torch.tensor(weights, dtype=torch.float32) if any(w != 1.0 for w in weights) else None


def draw_noise(schedule, x0: torch.Tensor, rngs: Sequence[SampleRng], obj) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's timestep and noise from its own generator (after its flip), batched."""
    timesteps = torch.cat([schedule.sample_timesteps(1, rng.torch, obj, latent_shape=x0.shape[1:])
                           for rng in rngs]).to(x0.device)
    noise = torch.cat([objectives.sample_noise(x0[i:i + 1], rng.torch, obj) for i, rng in enumerate(rngs)])
    return timesteps, noise


def compute_loss(host, x0: torch.Tensor, cond: Conditioning, cfg: TrainConfig, generator: Optional[torch.Generator],
                 timesteps: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                 sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Loss in the model's own parameterization (eps / v / flow velocity), with the configured weighting."""
    schedule, obj = host.schedule, cfg.objective
    if timesteps is None:
        timesteps = schedule.sample_timesteps(x0.shape[0], generator, obj, latent_shape=x0.shape[1:]).to(x0.device)
    if noise is None:
        noise = objectives.sample_noise(x0, generator, obj)
    noisy = schedule.add_noise(x0, noise, timesteps)
    prediction = host.predict(noisy.to(host.dtype), timesteps, cond.to(dtype=host.dtype)).float()
    target = schedule.target(x0, noise, timesteps)
    weights = objectives.loss_weights(schedule, timesteps, obj)
    if sample_weights is not None:  # e.g. regularisation images at prior_loss_weight
        weights = weights * sample_weights.to(weights)
    return objectives.loss(prediction, target, weights, obj)


def _run_preview(hooks: Hooks, step: int, network: LoRANetwork, runlog, reporter, device) -> None:
    from ..monitor.events import preview_url

    network.eval()
    # ComfyUI's sampler reseeds the global RNGs; fork them so the adapters' dropout after a preview draws exactly
    # what it would have drawn without one (a stopped-and-resumed run then equals an unstopped one).
    cuda = [device] if torch.device(device).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            path = hooks.preview(step, network)
        if path and runlog is not None:
            runlog.mark(step, "preview", Path(path).name)
        if path and reporter is not None:
            reporter.preview(step, preview_url(reporter.run, Path(path).name))
    finally:
        network.train()
