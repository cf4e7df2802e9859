"""Headless training: dataset → buckets → cached latents → train → LoRA file, loss plot and state folder.

The same steps the ComfyUI nodes run, driven by one config file (JSON or YAML):

    model: path/to/diffusers-model-folder        # unet/, vae/, text_encoder/, tokenizer/, scheduler/
    device: cpu                                  # or cuda, cuda:1 ...
    model_dtype: fp32                            # dtype the frozen weights load in: fp32 | fp16 | bf16
    dataset: {folder: my_images, trigger_word: ohwx, ...}          # trainer.config.DatasetConfig
    buckets: {resolutions: [512], min_bucket: 256, max_bucket: 1024}  # trainer.config.BucketConfig
    train: {steps: 1000, batch_size: 2, network: {rank: 16, alpha: 16}, optimizer: {learning_rate: 1e-4}}
    output: {run_dir: runs/my_lora, lora: runs/my_lora/my_lora.safetensors, cache_dir: .cache/loralab,
             numbered_loras: false, tensorboard: false}   # <lora>-<step>.safetensors beside it; <run_dir>/tensorboard
    resume: false

Under ``torchrun`` / ``accelerate launch`` every process runs this (``training/distributed.py``): ``batch_size`` is
per process, rank 0 caches first and is the only one that prints and writes files.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .choices import OUTPUT_DTYPES
from .config import BucketConfig, DatasetConfig, TrainConfig, _build
from .errors import ConfigError

log = logging.getLogger("loralab")

TOP_LEVEL_KEYS = {"model", "device", "model_dtype", "dataset", "buckets", "train", "output", "resume", "title", "trigger_phrase",
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
    model_dtype: str = "fp32"
    numbered_loras: bool = False  # also write <lora stem>-<step:06d>.safetensors beside output.lora
    tensorboard: bool = False  # log to <run_dir>/tensorboard (needs the tensorboard package)

    @property
    def weights_dtype(self):
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.model_dtype]

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
        switches = {key: output.pop(key, False) for key in ("numbered_loras", "tensorboard")}
        if output:
            raise ConfigError(f"unknown output setting(s) {', '.join(sorted(output))}; known: run_dir, lora, "
                              "cache_dir, numbered_loras, tensorboard")
        for key, value in switches.items():
            if not isinstance(value, bool):
                raise ConfigError(f"output.{key} = {value!r} must be true or false")
        resolve = lambda p: p if p.is_absolute() else base / p  # noqa: E731 - paths are relative to the config
        dataset = _build(DatasetConfig, data.get("dataset") or {}, "dataset.")
        if dataset.folder and not Path(dataset.folder).is_absolute():
            dataset.folder = str(base / dataset.folder)
        model = Path(data["model"])
        model_dtype = str(data.get("model_dtype", "fp32"))
        if model_dtype not in OUTPUT_DTYPES:
            raise ConfigError(f"model_dtype = {model_dtype!r} is not valid; choose one of: {', '.join(OUTPUT_DTYPES)}")
        return cls(
            model=str(resolve(model)), dataset=dataset, buckets=_build(BucketConfig, data.get("buckets") or {}, "buckets."),
            train=TrainConfig.from_dict(data.get("train") or {}), run_dir=resolve(run_dir),
            lora_path=resolve(lora_path), cache_dir=resolve(cache_dir), device=str(data.get("device", "cpu")),
            resume=bool(data.get("resume", False)), title=str(data.get("title", "")),
            trigger_phrase=str(data.get("trigger_phrase", dataset.trigger_word)),
            allow_over_memory=bool(data.get("allow_over_memory", False)), model_dtype=model_dtype, **switches,
        )


def run(spec: HeadlessSpec, echo=print):
    """Train one LoRA headless: scan and cache the data, then the same :class:`trainer.run.Run` Train LoRA uses.
    Writes the LoRA (and its EMA twin) where ``output.lora`` says, and the loss plot. Returns the RunResult."""
    import torch

    from .data.cache import prepare_latents
    from .data.dataset import scan_dataset
    from .files.lora_file import save_lora
    from .hosts.diffusers_host import DiffusersHost
    from .monitor.plot import save_loss_plot
    from .monitor.runlog import read_history
    from .preflight.checks import preflight, raise_problems
    from .files.numbered import NumberedLoRAs
    from .monitor.tensorboard import missing_message
    from .preflight.naming import CONFIG_KEYS
    from .run import Run, ema_path
    from .training import distributed

    if not distributed.is_main():
        echo = _quiet  # one voice: rank 0 prints for all processes
    torch.manual_seed(spec.train.seed)
    host = DiffusersHost(spec.model, device=spec.device, dtype=spec.weights_dtype)
    echo(f"model: {spec.model} ({host.family}, {host.schedule.describe()}) on {host.device}")
    # every settings problem at once, before any time is spent caching (the Run checks again with the cached data)
    raise_problems(preflight(host, spec.train, spec.dataset, spec.buckets, latent_channels_from_vae=host.latent_channels,
                             output_dir=spec.run_dir, cache_dir=spec.cache_dir))
    if spec.tensorboard and missing_message():
        raise ConfigError(CONFIG_KEYS.text(missing_message()))
    dataset = scan_dataset(spec.dataset, min_size=min(spec.buckets.resolutions))
    echo(dataset.report.to_text())
    with distributed.one_writer_first():  # rank 0 encodes what is missing, the others then find it in the cache
        latents = prepare_latents(dataset, spec.buckets, host.encode_images, host.image_encoder_id,
                                  spec.cache_dir / "latents", seed=spec.train.seed)
    echo(latents.report.to_text())

    def emit(payload: dict) -> None:
        if payload["phase"] == "training":
            echo(f"step {payload['step']}/{payload['total']}  loss {payload['loss']:.4f}  "
                 f"lr {payload['lr']:.2e}  {payload.get('it_per_s') or 0:.2f} it/s")
        elif payload.get("message"):
            echo(f"[{payload['phase']}] {payload['message']}")

    result = Run(host, latents, spec.train, run_dir=spec.run_dir, dataset_cfg=spec.dataset, bucket_cfg=spec.buckets,
                 cache_dir=spec.cache_dir, image_count=len(dataset.items),
                 resume="required" if spec.resume else "auto", title=spec.title or spec.lora_path.stem,
                 trigger_phrase=spec.trigger_phrase, allow_over_memory=spec.allow_over_memory, emit=emit,
                 min_interval=1.0, tensorboard=spec.tensorboard,
                 numbered=NumberedLoRAs(spec.lora_path.parent, spec.lora_path.stem, spec.train.output_dtype)
                 if spec.numbered_loras else None).execute()
    if not distributed.is_main():
        return result  # the files are rank 0's to write
    echo(result.estimate)
    echo(result.summary())
    save_lora(spec.lora_path, result.lora, result.metadata, dtype=spec.train.output_dtype)
    echo(f"saved LoRA: {spec.lora_path}")
    if result.ema is not None:
        save_lora(ema_path(spec.lora_path), result.ema, result.metadata, dtype=spec.train.output_dtype)
        echo(f"saved EMA LoRA: {ema_path(spec.lora_path)}")
    plot_path = spec.run_dir / "loss.png"
    save_loss_plot(read_history(spec.run_dir), plot_path)
    echo(f"loss plot: {plot_path}")
    return result


def _quiet(*args, **kwargs) -> None:
    pass
