"""Headless training: dataset → buckets → cached latents → train → LoRA file, loss plot and state folder.

The same steps the ComfyUI nodes run, driven by one config file (JSON or YAML):

    model: path/to/diffusers-model-folder        # unet/, vae/, text_encoder/, tokenizer/, scheduler/
    device: cpu                                  # or cuda, cuda:1 ...
    dataset: {folder: my_images, trigger_word: ohwx, ...}          # trainer.config.DatasetConfig
    buckets: {resolutions: [512], min_bucket: 256, max_bucket: 1024}  # trainer.config.BucketConfig
    train: {steps: 1000, batch_size: 2, network: {rank: 16, alpha: 16}, optimizer: {learning_rate: 1e-4}}
    output: {run_dir: runs/my_lora, lora: runs/my_lora/my_lora.safetensors, cache_dir: .cache/loralab}
    resume: false
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import BucketConfig, DatasetConfig, TrainConfig, _build
from .errors import ConfigError

log = logging.getLogger("loralab")

TOP_LEVEL_KEYS = {"model", "device", "dataset", "buckets", "train", "output", "resume", "title", "trigger_phrase",
                  "allow_over_memory"}


@dataclass
class HeadlessSpec:
    model: str
    dataset: DatasetConfig
    buckets: BucketConfig
    train: TrainConfig
    run_dir: Path
    lora_path: Path
    cache_dir: Path
    device: str = "cpu"
    resume: bool = False
    title: str = ""
    trigger_phrase: str = ""
    allow_over_memory: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path = Path(".")) -> "HeadlessSpec":
        unknown = sorted(set(data) - TOP_LEVEL_KEYS)
        if unknown:
            raise ConfigError(f"unknown top-level setting(s) {', '.join(unknown)}; known: {', '.join(sorted(TOP_LEVEL_KEYS))}")
        if not data.get("model"):
            raise ConfigError("setting 'model' is missing: give the path of a local diffusers model folder")
        output = dict(data.get("output") or {})
        run_dir = Path(output.pop("run_dir", "runs/lora"))
        lora_path = Path(output.pop("lora", run_dir / f"{run_dir.name}.safetensors"))
        cache_dir = Path(output.pop("cache_dir", run_dir.parent / ".cache"))
        if output:
            raise ConfigError(f"unknown output setting(s) {', '.join(sorted(output))}; known: run_dir, lora, cache_dir")
        resolve = lambda p: p if p.is_absolute() else base / p  # noqa: E731 - paths are relative to the config
        dataset = _build(DatasetConfig, data.get("dataset") or {}, "dataset.")
        if dataset.folder and not Path(dataset.folder).is_absolute():
            dataset.folder = str(base / dataset.folder)
        model = Path(data["model"])
        return cls(
            model=str(resolve(model)), dataset=dataset, buckets=_build(BucketConfig, data.get("buckets") or {}, "buckets."),
            train=TrainConfig.from_dict(data.get("train") or {}), run_dir=resolve(run_dir),
            lora_path=resolve(lora_path), cache_dir=resolve(cache_dir), device=str(data.get("device", "cpu")),
            resume=bool(data.get("resume", False)), title=str(data.get("title", "")),
            trigger_phrase=str(data.get("trigger_phrase", dataset.trigger_word)),
            allow_over_memory=bool(data.get("allow_over_memory", False)),
        )


def run(spec: HeadlessSpec, echo=print):
    """Train one LoRA headless. Returns the loop's TrainResult."""
    import torch

    from .data.cache import prepare_latents
    from .data.dataset import scan_dataset
    from .files.atomic import write_text
    from .files.lora_file import build_metadata, save_lora
    from .hosts.diffusers_host import DiffusersHost
    from .monitor.events import ProgressReporter
    from .monitor.plot import save_loss_plot
    from .monitor.runlog import ESTIMATE_FILE, RunLog, read_history
    from .preflight.checks import preflight, raise_problems
    from .preflight.memory import check_fits, estimate_training_memory, measured_peak, oom_report
    from .training.loop import Hooks, train

    torch.manual_seed(spec.train.seed)
    host = DiffusersHost(spec.model, device=spec.device)
    echo(f"model: {spec.model} ({host.family}, {host.schedule.prediction}-prediction) on {host.device}")
    raise_problems(preflight(host, spec.train, spec.dataset, spec.buckets, latent_channels_from_vae=host.latent_channels,
                             output_dir=spec.run_dir, cache_dir=spec.cache_dir,
                             resume_dir=spec.run_dir if spec.resume else None))
    dataset = scan_dataset(spec.dataset, min_size=min(spec.buckets.resolutions))
    echo(dataset.report.to_text())
    latents = prepare_latents(dataset, spec.buckets, host.encode_images, host.image_encoder_id,
                              spec.cache_dir / "latents", seed=spec.train.seed)
    echo(latents.report.to_text() if hasattr(latents.report, "to_text") else str(latents.report))

    estimate = estimate_training_memory(host, spec.train, sorted({s.bucket for s in latents.samples}),
                                        resident_encoders=True)
    echo(estimate.to_text())
    note = check_fits(estimate, spec.allow_over_memory)
    if note:
        echo(note)
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    config_record = {"model": spec.model, "dataset": dataclasses.asdict(spec.dataset),
                     "buckets": dataclasses.asdict(spec.buckets), "train": spec.train.to_dict()}
    write_text(spec.run_dir / "config.json", json.dumps(config_record, indent=1))
    write_text(spec.run_dir / ESTIMATE_FILE, "\n".join([estimate.to_text()] + ([note] if note else [])) + "\n")

    def emit(payload: dict) -> None:
        if payload["phase"] == "training":
            echo(f"step {payload['step']}/{payload['total']}  loss {payload['loss']:.4f}  "
                 f"lr {payload['lr']:.2e}  {payload.get('it_per_s') or 0:.2f} it/s")
        elif payload.get("message"):
            echo(f"[{payload['phase']}] {payload['message']}")

    reporter = ProgressReporter(emit, node="cli", run=spec.run_dir.name, total=spec.train.steps, min_interval=1.0)
    with RunLog(spec.run_dir) as runlog:
        result = train(host, latents, spec.train, spec.run_dir, dataset_cfg=spec.dataset,
                       text_cache_dir=spec.cache_dir / "text", resume=spec.resume, reporter=reporter, runlog=runlog,
                       hooks=Hooks(oom_report=lambda step: oom_report(estimate, measured_peak(host), step)))
    metadata = build_metadata(
        spec.train, family=host.family, prediction=host.schedule.prediction,
        resolution=max(spec.buckets.resolutions), title=spec.title or spec.lora_path.stem,
        trigger_phrase=spec.trigger_phrase, notes="", extra={"ss_num_train_images": str(len(dataset.items))},
    )
    save_lora(spec.lora_path, result.network.kohya_state_dict(), metadata, dtype=spec.train.output_dtype)
    echo(f"saved LoRA: {spec.lora_path}")
    if result.ema is not None:
        with result.ema.swapped():
            ema_path = spec.lora_path.with_name(spec.lora_path.stem + "_ema.safetensors")
            save_lora(ema_path, result.network.kohya_state_dict(), metadata, dtype=spec.train.output_dtype)
        echo(f"saved EMA LoRA: {ema_path}")
    plot_path = spec.run_dir / "loss.png"
    save_loss_plot(read_history(spec.run_dir), plot_path)
    echo(f"loss plot: {plot_path}")
    return result
