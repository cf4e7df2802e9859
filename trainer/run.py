"""One training run, the same for every front-end: find the run → pre-flight → estimate → train → save (+ EMA).

Train LoRA (ComfyUI) and ``python -m trainer train`` both build a host and cached latents, then call
``Run(...).execute()``. What differs between them is passed in: where progress goes (``emit``), callbacks for the
progress bar and previews (``hooks``), and the names written into the file's metadata.

A run folder holds one run (see ``training/identity.py``): the same model, settings and data always land in the
same folder, so executing again

* reuses the finished LoRA when it already has the requested number of steps ("reused");
* continues from the newest snapshot when there is one ("resumed"): after Stop, out of memory, or with more steps
  (the LR schedule is then the one for the new total, see ``training/optim.py`` ``sync_lr``);
* trains from step 0 otherwise ("trained").

Fewer steps than the run already has would need a different schedule from the start: that is refused with the
way out (another run name). Files in the run folder: ``final.safetensors`` (fp32, with metadata) and, with EMA on,
``final_ema.safetensors``; the front-end copies them where users look for LoRAs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .config import BucketConfig, DatasetConfig, TrainConfig
from .errors import TrainingError
from .preflight.naming import CONFIG_KEYS
from .training.schedules import describe_timesteps, resolve_timestep_sampling

FINAL_LORA = "final.safetensors"
FINAL_EMA_LORA = "final_ema.safetensors"
IDENTITY_KEY = "loralab_run_identity"  # LoRA metadata: the run that made the file (reuse checks it)
RESUME_POLICIES = ("auto", "required")


@dataclass
class RunResult:
    lora: dict  # kohya-keyed adapter tensors (fp32)
    ema: Optional[dict]  # the same keys with the EMA weights, or None without EMA
    metadata: dict[str, str]
    losses: list[float]
    run_dir: Path
    outcome: str  # "trained" | "resumed" | "reused"
    step: int
    prediction: str  # e.g. "prediction: v (1000-step discrete schedule)"
    precision: str  # e.g. "fp16 autocast with a gradient scaler (fp16 weights: ...)"
    notes: list[str] = field(default_factory=list)  # warnings and things the user should know
    estimate: str = ""
    timesteps: str = "uniform"  # how noise levels were drawn (training/schedules.py describe_timesteps)
    batch: str = ""  # the global batch, e.g. "4 (2 per process x 2 processes)" (describe_batch)

    def summary(self) -> str:
        """What the run did, for the node's text and the CLI (one fact per line)."""
        verb = {"reused": "reused the finished run", "resumed": "resumed and finished", "trained": "trained"}
        lines = [f"run: {self.run_dir}", f"{verb[self.outcome]}: {self.step} steps",
                 self.prediction + f", timesteps {self.timesteps}", f"precision: {self.precision}"]
        if self.batch:
            lines.append(f"batch: {self.batch}")
        if self.losses:
            lines.append(f"final loss: {self.losses[-1]:.4f}")
        if self.ema is not None:
            lines.append("EMA weights: kept (Save LoRA writes them as <name>_ema.safetensors)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


class Run:
    def __init__(self, host, latents, cfg: TrainConfig, *, run_dir: str | Path, dataset_cfg: DatasetConfig,
                 bucket_cfg: BucketConfig, cache_dir: str | Path, image_count: int, resume: str = "auto",
                 title: str = "", trigger_phrase: str = "", allow_over_memory: bool = False,
                 emit: Optional[Callable[[dict], None]] = None, node: str = "cli", min_interval: float = 0.25,
                 hooks=None, identity=None, check_dataset_folder: bool = False, naming=None, numbered=None,
                 tensorboard: bool = False):
        from .training.identity import RunIdentity

        if resume not in RESUME_POLICIES:
            raise ValueError(f"resume must be one of {RESUME_POLICIES}, got {resume!r}")
        # "auto" timestep sampling is the family's recipe: resolved first, so identity and file say what ran
        self.host, self.latents, self.cfg = host, latents, resolve_timestep_sampling(cfg, host.schedule)
        self.run_dir = Path(run_dir)
        self.dataset_cfg, self.bucket_cfg = dataset_cfg, bucket_cfg
        self.cache_dir, self.image_count = Path(cache_dir), image_count
        self.resume, self.title, self.trigger_phrase = resume, title, trigger_phrase
        self.allow_over_memory, self.emit, self.node, self.min_interval = allow_over_memory, emit, node, min_interval
        self.check_dataset_folder = check_dataset_folder
        self.hooks = hooks
        self.numbered, self.tensorboard = numbered, tensorboard  # optional outputs (outputs.py)
        self.naming = naming or CONFIG_KEYS  # the words advice uses for settings (preflight/naming.py)
        # The global batch defines the run: 2 processes at batch 2 continue what 1 process at batch 4 saved.
        self.identity = identity or RunIdentity.of(host, _with_global_batch(self.cfg), latents.samples,
                                                       dataset_cfg)

    # ------------------------------------------------------------------------------------------------ the sequence
    def execute(self) -> RunResult:
        from .training import distributed
        from .training.precision import resolve_precision
        from .training.state import latest_snapshot

        precision = resolve_precision(self.cfg.mixed_precision, self.host.dtype, self.host.device)
        reused = self._finished_run()
        snapshot = latest_snapshot(self.run_dir) if reused is None else None
        distributed.check_same((reused is not None, snapshot.name if snapshot else None),
                               f"states of the run folder '{self.run_dir}' (finished?, newest snapshot)")
        if reused is not None:
            reused.precision = precision.describe()
            return reused
        if self.tensorboard:
            from .monitor.tensorboard import missing_message

            if missing_message():
                raise TrainingError(self.naming.text(missing_message()))
        if snapshot is None and self.resume == "required":
            raise TrainingError(f"nothing to resume in '{self.run_dir}': it has no saved state (state/step_*)")
        if snapshot is not None:
            self._refuse_fewer_steps(snapshot)
        warnings = self._preflight(snapshot is not None)
        return self._train(precision, resuming=snapshot is not None, warnings=warnings)

    def _finished_run(self) -> Optional[RunResult]:
        """The finished LoRA of this very run (same identity and steps), or None."""
        from .files.lora_file import load_lora
        from .monitor.runlog import read_history

        final = self.run_dir / FINAL_LORA
        if not final.is_file():
            return None
        tensors, metadata = load_lora(final)
        if metadata.get(IDENTITY_KEY) != json.dumps(self.identity.to_dict(), sort_keys=True):
            return None
        if int(metadata.get("ss_steps", -1)) != self.cfg.steps:
            return None
        ema_file = self.run_dir / FINAL_EMA_LORA
        ema = load_lora(ema_file)[0] if ema_file.is_file() else None
        losses = [float(x) for x in read_history(self.run_dir).get("loss", [])][: self.cfg.steps]
        return RunResult(lora=tensors, ema=ema, metadata=metadata, losses=losses, run_dir=self.run_dir,
                         outcome="reused", step=self.cfg.steps, prediction=self.host.schedule.describe(),
                         precision="", estimate=_read_estimate(self.run_dir),
                         timesteps=describe_timesteps(self.cfg.objective), batch=describe_batch(self.cfg))

    def _refuse_fewer_steps(self, snapshot: Path) -> None:
        saved = int(json.loads((snapshot / "meta.json").read_text()).get("step", 0))
        if saved > self.cfg.steps:
            raise TrainingError(
                f"the run in '{self.run_dir}' has already trained {saved} steps with these settings; steps = "
                f"{self.cfg.steps} would need a different learning-rate schedule from the start. Set steps to "
                f"{saved} or more to reuse or continue it, or change the run name to train a separate shorter run "
                f"(its snapshots are in '{snapshot.parent}')")

    def _preflight(self, resuming: bool) -> list[str]:
        from .preflight.checks import preflight, raise_problems

        samples = self.latents.samples
        problems = preflight(
            self.host, self.cfg, self.dataset_cfg if self.check_dataset_folder else None, self.bucket_cfg,
            latent_channels_from_vae=samples[0].latent.shape[0] if samples else None,
            output_dir=self.run_dir.parent, cache_dir=self.cache_dir,
            resume_dir=self.run_dir if resuming else None, identity=self.identity,
            preview_every=self.hooks.preview_every if self.hooks and self.hooks.preview else 0)
        return [w.render(self.naming) for w in raise_problems(problems, self.naming)]

    def _train(self, precision, resuming: bool, warnings: list[str]) -> RunResult:
        from .files.atomic import write_text
        from .monitor.events import ProgressReporter, fanout, reset_peak_memory
        from .monitor.runlog import ESTIMATE_FILE, RunLog
        from .preflight.memory import check_fits, estimate_training_memory, measured_peak, oom_report
        from .training import distributed
        from .training.loop import Hooks, text_encoder_stays_loaded, train

        cfg, host = self.cfg, self.host
        writer = distributed.is_main()  # one writer: only rank 0 touches the run folder
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if writer:
            write_text(self.run_dir / "config.json", json.dumps(self._config_record(), indent=1))
        keep_te = text_encoder_stays_loaded(cfg, self.dataset_cfg)
        hooks = self.hooks or Hooks()
        tensorboard = None
        if writer:  # numbered LoRAs and TensorBoard: the writer's, like the run folder
            from .monitor.tensorboard import TensorBoardLog
            from .monitor.runlog import read_history
            from .outputs import attach

            tensorboard = TensorBoardLog(self.run_dir, memory=lambda: host.memory,
                                         history=lambda: read_history(self.run_dir)) if self.tensorboard else None
            hooks = attach(hooks, run_dir=self.run_dir, cfg=cfg, numbered=self.numbered, metadata=self._metadata,
                           tensorboard=tensorboard)
        # One training session (model loaded, autograd-ready weights) serves the estimate's trace and the run.
        with host.training_session(keep_te, cfg.network.train_text_encoder):
            reset_peak_memory(host.device)  # the peak shown and compared with the estimate is this run's
            buckets = sorted({s.bucket for s in self.latents.samples})
            estimate = estimate_training_memory(host, cfg, buckets, resident_encoders=keep_te, naming=self.naming)
            fit_note = check_fits(estimate, self.allow_over_memory, self.naming)
            notes = warnings + ([fit_note] if fit_note else []) + _per_process_note(host.device)
            estimate_text = "\n".join([estimate.to_text()] + notes)
            if writer:
                write_text(self.run_dir / ESTIMATE_FILE, estimate_text + "\n")
            hooks.oom_report = lambda step: oom_report(estimate, measured_peak(host), step)
            with (RunLog(self.run_dir) if writer else contextlib.nullcontext()) as runlog:
                reporter = ProgressReporter(fanout(self.emit, runlog.write_latest), node=self.node,
                                            run=self.run_dir.name, total=cfg.steps, min_interval=self.min_interval,
                                            estimate=estimate.comparable_peak, save_every=cfg.save_every,
                                            preview_every=hooks.preview_every if hooks.preview else 0) \
                    if writer else None
                if reporter is not None:
                    reporter.report("encoding", step=0, mem=host.memory, message="; ".join(
                        [estimate.summary(), precision.describe(), f"batch {describe_batch(cfg)}"] + notes))
                try:
                    result = train(host, self.latents, cfg, self.run_dir, dataset_cfg=self.dataset_cfg,
                                   text_cache_dir=self.cache_dir / "text", resume=resuming, reporter=reporter,
                                   hooks=hooks, runlog=runlog, precision=precision, identity=self.identity)
                finally:
                    if tensorboard is not None:
                        tensorboard.close()
        lora = result.network.kohya_state_dict()
        ema = _ema_state(result)
        metadata = self._metadata(result.step)
        if writer:
            self._save_final(lora, ema, metadata)
        return RunResult(lora=lora, ema=ema, metadata=metadata, losses=result.losses, run_dir=self.run_dir,
                         outcome="resumed" if resuming else "trained", step=result.step,
                         prediction=host.schedule.describe(), precision=precision.describe(),
                         notes=result.notes + notes, estimate=estimate_text,
                         timesteps=describe_timesteps(cfg.objective), batch=describe_batch(cfg))

    # ------------------------------------------------------------------------------------------------ the outputs
    def _metadata(self, steps: int) -> dict[str, str]:
        from .files.lora_file import build_metadata

        return build_metadata(
            self.cfg, family=self.host.family, prediction=self.host.schedule.prediction,
            resolution=max(self.bucket_cfg.resolutions), title=self.title or self.run_dir.name,
            trigger_phrase=self.trigger_phrase, notes="", steps=steps,
            extra={"ss_num_train_images": str(self.image_count),
                   "ss_total_batch_size": str(_with_global_batch(self.cfg).batch_size
                                              * self.cfg.optimizer.grad_accumulation),
                   IDENTITY_KEY: json.dumps(self.identity.to_dict(), sort_keys=True)})

    def _save_final(self, lora: dict, ema: Optional[dict], metadata: dict) -> None:
        from .files.lora_file import save_lora

        ema_file = self.run_dir / FINAL_EMA_LORA
        if ema is not None:
            save_lora(ema_file, ema, metadata, dtype="fp32")
        elif ema_file.exists():
            ema_file.unlink()
        save_lora(self.run_dir / FINAL_LORA, lora, metadata, dtype="fp32")  # last: it marks the run finished

    def _config_record(self) -> dict:
        from .training import distributed

        return {"train": self.cfg.to_dict(), "dataset": dataclasses.asdict(self.dataset_cfg),
                "buckets": dataclasses.asdict(self.bucket_cfg), "identity": self.identity.to_dict(),
                "model": {"family": self.host.family, "schedule": self.host.schedule.describe()},
                "batch": {"per_process": self.cfg.batch_size, "processes": distributed.world_size(),
                          "global": _with_global_batch(self.cfg).batch_size}}


def _with_global_batch(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``batch_size`` = the global batch (``train.batch_size`` is per process)."""
    from .training import distributed

    return dataclasses.replace(cfg, batch_size=distributed.global_batch_size(cfg.batch_size))


def describe_batch(cfg: TrainConfig) -> str:
    """The global batch for the node's text and the run log: "4 (2 per process x 2 processes)", plus what gradient
    accumulation makes of it."""
    from .training import distributed

    processes = distributed.world_size()
    text = str(cfg.batch_size * processes)
    if processes > 1:
        text += f" ({cfg.batch_size} per process x {processes} processes)"
    accumulation = cfg.optimizer.grad_accumulation
    if accumulation > 1:
        text += f", x {accumulation} accumulated = {cfg.batch_size * processes * accumulation} per optimizer step"
    return text


def _per_process_note(device) -> list[str]:
    from .training import distributed

    if distributed.world_size() == 1:
        return []
    local = distributed.local_world_size()
    shared = (f"; the {local} processes on this machine share its RAM, about {local}x this in all"
              if str(device).startswith("cpu") and local > 1 else "")
    return [f"the memory estimate is per process ({distributed.world_size()} processes){shared}"]


def _ema_state(result) -> Optional[dict]:
    if result.ema is None:
        return None
    with result.ema.swap():
        return result.network.kohya_state_dict()


def _read_estimate(run_dir: Path) -> str:
    from .monitor.runlog import read_estimate

    return read_estimate(run_dir) or ""


def ema_path(path: str | Path) -> Path:
    """Where the EMA twin of a LoRA file goes: ``<name>_ema.safetensors`` beside it."""
    path = Path(path)
    return path.with_name(path.stem + "_ema" + path.suffix)
