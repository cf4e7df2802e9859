"""Pre-flight checks: every input is checked before training starts, and all problems come back together.

``preflight(host, cfg, dataset_cfg, bucket_cfg, latent_channels_from_vae=..., output_dir=..., cache_dir=...)``
returns a list of :class:`Problem` (empty when everything is fine); :func:`raise_problems` raises ONE
:class:`~trainer.hosts.base.TrainingError` that lists every error, so a user fixes them all in one go instead of meeting
them one traceback at a time. Each problem names the setting and says how to fix it, in the front-end's words
(``naming.py``: config keys headless, the node's widgets in ComfyUI). Checks are cheap: nothing here
trains, reads images or loads files bigger than a resume folder's meta.json; the model is only asked for its
adapter targets and to encode one empty caption.

Checks (in this order): names of choices (optimizer, scheduler, loss, timestep sampling, mixed precision, network
targets, output dtype, bucket crop), numbers (steps, batch size, gradient accumulation, saving, learning rates,
ranks, alpha, dropout, the LoRA to continue from, objective values), mixed precision vs the device, buckets (step, resolutions, min/max),
settings that defeat themselves (warnings: warmup as long as the run, save / preview intervals longer than it, an
8-bit optimizer without CUDA, a resolution far from the model family's own),
the model (VAE latent channels, text-context width, text encoder presence, rank vs every target layer), the
dataset folder, the output and cache folders (writable, free disk), and the resume folder (same model, same
settings).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..choices import (
    ALGORITHMS,
    CROPS,
    LOSSES,
    MIXED_PRECISIONS,
    OPTIMIZERS,
    OUTPUT_DTYPES,
    SCHEDULERS,
    TARGET_SETS,
    TIMESTEP_SAMPLINGS,
)
from ..config import BucketConfig, DatasetConfig, TrainConfig
from ..data.dataset import _existing_folder
from ..data.images import IMAGE_EXTENSIONS, is_image_file
from ..errors import ConfigError, TrainingError
from ..families import FAMILIES
from ..training.objectives import validate_objective
from .naming import CONFIG_KEYS, Naming, setting_ref

LATENT_FACTOR = 8
DISK_MARGIN = 0.10  # want 10 % more free disk than the outputs are estimated to take
SAFETENSORS_OVERHEAD = 64 * 1024  # header + metadata of one LoRA file (metadata holds the config JSON)
MAX_LISTED = 5  # layers named in one "rank too large" problem
EIGHT_BIT_OPTIMIZERS = ("adamw8bit", "lion8bit")  # bitsandbytes: made for CUDA
NATIVE_RESOLUTION = {f.name: f.native_resolution for f in FAMILIES.values()}  # the side each family was trained at
FAR_FROM_NATIVE = 1.5  # a training resolution outside native / 1.5 .. native * 1.5 gets a warning


@dataclass
class Problem:
    setting: str  # e.g. "network.rank", "dataset.folder", "VAE"
    message: str  # what is wrong
    fix: str  # what to do
    level: str = "error"  # "error" stops training; "warning" is shown and training goes on

    def __str__(self) -> str:
        return self.render(CONFIG_KEYS)

    def render(self, naming: Naming = CONFIG_KEYS) -> str:
        """The problem in a front-end's words: config keys headless, the node's widgets in ComfyUI."""
        return f"{naming(self.setting)}: " + naming.text(f"{self.message}. Fix: {self.fix}")

    def to_dict(self) -> dict[str, str]:
        return {"setting": self.setting, "message": self.message, "fix": self.fix, "level": self.level}


def raise_problems(problems: Sequence[Problem], naming: Naming = CONFIG_KEYS) -> list[Problem]:
    """Raise one TrainingError listing every error (warnings included for context), in ``naming``'s words; return
    the warnings if there is no error."""
    errors = [p for p in problems if p.level == "error"]
    warnings = [p for p in problems if p.level != "error"]
    if errors:
        lines = [f"Training cannot start: {len(errors)} problem{'s' if len(errors) > 1 else ''} with the settings:"]
        lines += [f"  {i}. {p.render(naming)}" for i, p in enumerate(errors, 1)]
        if warnings:
            lines.append("Also:")
            lines += [f"  - {p.render(naming)}" for p in warnings]
        error = TrainingError("\n".join(lines))
        error.problems = list(problems)  # type: ignore[attr-defined]
        raise error
    return warnings


# ============================================================================================== choice lists
def _choices() -> dict[str, tuple[str, ...]]:
    """The valid names, from the modules that implement them."""
    return {
        "optimizer.name": tuple(OPTIMIZERS), "optimizer.scheduler": tuple(SCHEDULERS),
        "objective.loss": tuple(LOSSES), "objective.timestep_sampling": tuple(TIMESTEP_SAMPLINGS),
        "network.targets": tuple(TARGET_SETS), "mixed_precision": MIXED_PRECISIONS, "output_dtype": OUTPUT_DTYPES,
        "buckets.crop": CROPS, "network.algorithm": ALGORITHMS,
    }


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _bad_positive(x: Any) -> bool:
    return not _is_number(x) or not math.isfinite(x) or x <= 0


def _bad_int(x: Any, minimum: int) -> bool:
    return not isinstance(x, int) or isinstance(x, bool) or x < minimum


# ================================================================================================ the checks
def check_settings(cfg: TrainConfig, bucket_cfg: Optional[BucketConfig], device_type: str) -> list[Problem]:
    """Checks that need no model: names, numbers, mixed precision vs device, buckets."""
    problems: list[Problem] = []
    choices = _choices()
    named = {
        "optimizer.name": cfg.optimizer.name, "optimizer.scheduler": cfg.optimizer.scheduler,
        "objective.loss": cfg.objective.loss, "objective.timestep_sampling": cfg.objective.timestep_sampling,
        "mixed_precision": cfg.mixed_precision, "network.targets": cfg.network.targets,
        "network.algorithm": cfg.network.algorithm,
        "output_dtype": cfg.output_dtype,
    }
    if bucket_cfg is not None:
        named["buckets.crop"] = bucket_cfg.crop
    for setting, value in named.items():
        if value not in choices[setting]:
            problems.append(Problem(setting, f"{value!r} is not a known choice",
                                    f"choose one of: {', '.join(choices[setting])}"))

    # --- counts ---
    for setting, value, minimum, fix in (
        ("steps", cfg.steps, 1, "set steps to at least 1 (500-2000 is usual for a LoRA)"),
        ("batch_size", cfg.batch_size, 1, "set batch_size to at least 1"),
        ("optimizer.grad_accumulation", cfg.optimizer.grad_accumulation, 1, "set it to 1 (no accumulation) or more"),
        ("save_every", cfg.save_every, 0, "set save_every to 0 (no periodic saves) or a number of steps"),
        ("keep_last", cfg.keep_last, 0, "set keep_last to 0 (keep all) or the number of snapshots to keep"),
        ("optimizer.warmup_steps", cfg.optimizer.warmup_steps, 0, "set warmup_steps to 0 or more"),
        ("clip_skip", cfg.clip_skip, 1, "set clip_skip to 1 (last layer) or 2 (penultimate)"),
    ):
        if _bad_int(value, minimum):
            problems.append(Problem(setting, f"{value!r} must be a whole number >= {minimum}", fix))

    # --- learning rates ---
    lr = cfg.optimizer.learning_rate
    if _bad_positive(lr):
        problems.append(Problem("optimizer.learning_rate", f"{lr!r} must be a finite number > 0",
                                "use 1e-4 for AdamW (1.0 only for Prodigy-style optimizers)"))
    te_lr = cfg.optimizer.text_encoder_lr
    if te_lr is not None and _bad_positive(te_lr):
        problems.append(Problem("optimizer.text_encoder_lr", f"{te_lr!r} must be a finite number > 0",
                                "leave it empty to use learning_rate, or use about half of it (5e-5)"))
    if _is_number(cfg.optimizer.max_grad_norm) and (not math.isfinite(cfg.optimizer.max_grad_norm)
                                                   or cfg.optimizer.max_grad_norm < 0):
        problems.append(Problem("optimizer.max_grad_norm", f"{cfg.optimizer.max_grad_norm!r} must be >= 0",
                                "use 1.0, or 0 to disable clipping"))
    if not (0 <= cfg.ema_decay < 1):
        problems.append(Problem("ema_decay", f"{cfg.ema_decay!r} must be in [0, 1)", "use 0 (off) or 0.999"))

    # --- network numbers ---
    net = cfg.network
    if _bad_int(net.rank, 1):
        problems.append(Problem("network.rank", f"{net.rank!r} must be a whole number >= 1",
                                "use 16 (4-64 is usual)"))
    if _bad_int(net.conv_rank, 0):
        problems.append(Problem("network.conv_rank", f"{net.conv_rank!r} must be a whole number >= 0",
                                "use 0 (no LoCon) or 4-16"))
    for setting, value in (("network.alpha", net.alpha), ("network.conv_alpha", net.conv_alpha)):
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            problems.append(Problem(setting, f"{value!r} must be a finite number >= 0",
                                    "set it equal to the rank (scale 1) or half of it"))
    if not _is_number(net.dropout) or not (0 <= net.dropout < 1):
        problems.append(Problem("network.dropout", f"{net.dropout!r} must be in [0, 1)", "use 0 (or 0.1)"))
    if net.init_from and not Path(net.init_from).is_file():
        problems.append(Problem("network.init_from", f"there is no LoRA file at '{net.init_from}'",
                                "give the path of an existing .safetensors LoRA (in ComfyUI: pick one in Configure "
                                "LoRA's continue_from list), or leave it empty to start from scratch"))
    problems += check_algorithm(cfg)

    # --- objective numbers (the objective module's own messages) ---
    try:
        validate_objective(cfg.objective)
    except ConfigError as e:  # noqa: BLE001 - ConfigError: "objective.x = v must be ...": split setting from text
        text = str(e)
        setting = text.split(" ", 1)[0] if text.startswith("objective.") else "objective"
        if not any(p.setting == setting for p in problems):
            problems.append(Problem(setting, text, "see the value suggested in the message"))

    # --- mixed precision vs device ---
    if cfg.mixed_precision == "fp16" and device_type == "cpu":
        problems.append(Problem("mixed_precision", "fp16 autocast on the CPU is slow (most CPU kernels are fastest "
                                "in fp32 or bf16)", "use auto (fp32 weights compute in fp32) or bf16 on the CPU",
                                level="warning"))
    elif cfg.mixed_precision == "bf16" and device_type == "cuda":
        try:
            import torch

            if not torch.cuda.is_bf16_supported():
                problems.append(Problem("mixed_precision", "this GPU has no bf16 support",
                                        "use auto (fp16 weights then train in fp16 with a gradient scaler)"))
        except Exception:  # noqa: BLE001
            pass

    if bucket_cfg is not None:
        problems += check_buckets(bucket_cfg)
    return problems


def check_algorithm(cfg: TrainConfig) -> list[Problem]:
    """The adapter algorithm's own settings, LoRA+, and whether the LoRA to continue from is of this algorithm."""
    from ..adapters.algorithms import NAMES, algorithm_of

    problems: list[Problem] = []
    net, ratio = cfg.network, cfg.optimizer.loraplus_lr_ratio
    if net.algorithm == "lokr" and (_bad_int(net.lokr_factor, -1) or net.lokr_factor == 0):
        problems.append(Problem("network.lokr_factor", f"{net.lokr_factor!r} must be -1 (the most balanced split) "
                                "or a whole number >= 1", "use -1, or 8 / 16 for a smaller small side"))
    if not _is_number(ratio) or not math.isfinite(ratio) or ratio < 0:
        problems.append(Problem("optimizer.loraplus_lr_ratio", f"{ratio!r} must be a finite number >= 0",
                                "use 0 (off) or 16 (LoRA+'s usual ratio)"))
    elif ratio > 0 and net.algorithm == "lokr" and net.lokr_full_matrix:
        problems.append(Problem("optimizer.loraplus_lr_ratio", f"{ratio:g} has no effect: LoKr with "
                                f"{setting_ref('network.lokr_full_matrix')} has no up/B factor to speed up",
                                f"set it to 0, or turn off {setting_ref('network.lokr_full_matrix')}",
                                level="warning"))
    if net.init_from and Path(net.init_from).is_file() and net.algorithm in NAMES:
        try:
            from safetensors import safe_open

            with safe_open(str(net.init_from), framework="pt", device="cpu") as f:
                found = algorithm_of(key.partition(".")[2] for key in f.keys())
        except Exception:  # noqa: BLE001 - unreadable files are reported when they are loaded, naming the file
            found = None
        if found is not None and found != net.algorithm:
            problems.append(Problem("network.init_from", f"'{net.init_from}' holds {NAMES[found]} weights but "
                                    f"{setting_ref('network.algorithm')} is {net.algorithm}",
                                    f"set {setting_ref('network.algorithm')} to {found} to continue from it, or "
                                    "start from scratch"))
    return problems


def check_buckets(b: BucketConfig) -> list[Problem]:
    problems: list[Problem] = []
    step_ok = isinstance(b.step, int) and b.step >= LATENT_FACTOR and b.step % LATENT_FACTOR == 0
    if not step_ok:
        problems.append(Problem("buckets.step", f"{b.step!r} must be a positive multiple of {LATENT_FACTOR} (the "
                                "VAE's downscaling)", "use 64"))
    if not b.resolutions:
        problems.append(Problem("buckets.resolutions", "no training resolution given", "use [512] for SD1.5, "
                                "[1024] for SDXL"))
        return problems
    for res in b.resolutions:
        if not isinstance(res, int) or isinstance(res, bool) or res <= 0:
            problems.append(Problem("buckets.resolutions", f"{res!r} must be a positive whole number of pixels",
                                    "use 512 for SD1.5, 1024 for SDXL"))
            continue
        if step_ok and res % b.step:
            lower, upper = res // b.step * b.step, (res // b.step + 1) * b.step
            nearest = [v for v in (lower, upper) if v > 0]
            problems.append(Problem("buckets.resolutions", f"{res} is not a multiple of buckets.step {b.step}",
                                    f"use {' or '.join(map(str, nearest))}, or change buckets.step"))
        if isinstance(b.min_bucket, int) and b.min_bucket > res:
            problems.append(Problem("buckets.min_bucket", f"{b.min_bucket} is larger than the resolution {res}: "
                                    "no bucket can hold that resolution's area", f"set min_bucket to at most {res} "
                                    f"(about {max(b.step if step_ok else 64, res // 2)} is usual)"))
        if isinstance(b.max_bucket, int) and b.max_bucket < res:
            problems.append(Problem("buckets.max_bucket", f"{b.max_bucket} is smaller than the resolution {res}: "
                                    "even a square bucket would not fit", f"set max_bucket to at least {res} "
                                    f"(about {res * 2} is usual)"))
    if isinstance(b.min_bucket, int) and isinstance(b.max_bucket, int):
        if b.min_bucket <= 0:
            problems.append(Problem("buckets.min_bucket", f"{b.min_bucket} must be > 0", "use 256"))
        if b.min_bucket > b.max_bucket:
            problems.append(Problem("buckets.min_bucket", f"{b.min_bucket} is larger than buckets.max_bucket "
                                    f"{b.max_bucket}", "swap them, e.g. min_bucket 256 and max_bucket 1024"))
        if step_ok:
            for name, value in (("buckets.min_bucket", b.min_bucket), ("buckets.max_bucket", b.max_bucket)):
                if value > 0 and value % b.step:
                    problems.append(Problem(name, f"{value} is not a multiple of buckets.step {b.step}",
                                            f"use {max(b.step, value // b.step * b.step)}"))
    return problems


def check_self_defeating(cfg: TrainConfig, bucket_cfg: Optional[BucketConfig], device_type: str,
                         family: Optional[str] = None, preview_every: int = 0) -> list[Problem]:
    """Warnings for settings that are valid but defeat their own purpose: a warmup as long as the run, save and
    preview intervals longer than the run, an 8-bit optimizer without CUDA, a resolution far from the model's own."""
    problems: list[Problem] = []
    steps = cfg.steps if not _bad_int(cfg.steps, 1) else None
    warmup = cfg.optimizer.warmup_steps
    lr = cfg.optimizer.learning_rate
    if steps and not _bad_int(warmup, 1) and warmup >= steps:
        problems.append(Problem(
            "optimizer.warmup_steps", f"{warmup} is not below {setting_ref('steps')} {steps}: the learning rate "
            f"ramps up for the whole run and {'never reaches' if warmup > steps else 'reaches only at the last step'} "
            f"{setting_ref('optimizer.learning_rate')} {lr:g}",
            f"set {setting_ref('optimizer.warmup_steps')} to about 5-10 % of the steps ({max(1, steps // 10)} here), "
            "or 0", level="warning"))
    for key, every, lost, off in (
        ("save_every", cfg.save_every, "no resumable state is saved during the run (only at the end, on Stop and on "
         "out-of-memory)", "0 to save only at the end"),
        ("preview_every", preview_every, "no preview is rendered in this run", "0 to turn previews off"),
    ):
        if steps and not _bad_int(every, 1) and every > steps:
            problems.append(Problem(key, f"{every} is more than {setting_ref('steps')} {steps}: {lost}",
                                    f"set {setting_ref(key)} to {max(1, steps // 4)} (a quarter of the run) or "
                                    f"another value up to {steps}, or {off}", level="warning"))
    if cfg.optimizer.name in EIGHT_BIT_OPTIMIZERS and device_type != "cuda":
        problems.append(Problem(
            "optimizer.name", f"{cfg.optimizer.name} is an 8-bit bitsandbytes optimizer, made for CUDA GPUs, but this "
            f"run is on {device_type}: bitsandbytes is either missing, refuses that device, or has no fast kernels "
            "for it (only recent releases run on the CPU at all)",
            f"choose adamw for {setting_ref('optimizer.name')} (or adafactor for the least optimizer memory) on "
            f"{device_type}", level="warning"))
    native = NATIVE_RESOLUTION.get(family or "")
    if native and bucket_cfg is not None:
        far = [r for r in bucket_cfg.resolutions if isinstance(r, int) and not isinstance(r, bool) and r > 0
               and not native / FAR_FROM_NATIVE <= r <= native * FAR_FROM_NATIVE]
        if far:
            low = far[0] < native
            problems.append(Problem(
                "buckets.resolutions", f"{', '.join(map(str, far))} px is far from the {native} px this "
                f"{FAMILIES[family].title} model was trained at: " + ("it learns from blurry, detail-poor images and generates worse at its "
                                             "own size" if low else "it generates repeated or stretched subjects at "
                                             "that size and training needs far more memory"),
                f"train at {native} ({setting_ref('buckets.resolutions')}), or within {native * 2 // 3}-"
                f"{int(native * FAR_FROM_NATIVE)} px", level="warning"))
    return problems


def check_objective_for_model(cfg: TrainConfig, prediction: Optional[str]) -> list[Problem]:
    """Objective settings that a flow model does not use (they are not errors: the node defaults are SD's)."""
    if prediction == "flow" and cfg.objective.min_snr_gamma > 0:
        return [Problem("objective.min_snr_gamma", f"min_snr_gamma {cfg.objective.min_snr_gamma:g} is not applied: "
                        "this is a flow model, trained unweighted with its noise levels shaped by timestep_sampling "
                        "(as SD3, Flux and the reference flow trainers do)",
                        f"set {setting_ref('objective.min_snr_gamma')} to 0 to silence this", level="warning")]
    return []


def check_model(host, cfg: TrainConfig, latent_channels_from_vae: Optional[int]) -> list[Problem]:
    """VAE channels, text-context width, text encoders for TE training, rank vs every target layer."""
    problems: list[Problem] = []
    want = getattr(host, "latent_channels", None)
    if latent_channels_from_vae is not None and want is not None and int(latent_channels_from_vae) != int(want):
        problems.append(Problem(
            "VAE", f"it makes {latent_channels_from_vae}-channel latents but this model expects {want}-channel "
            "latents (the VAE belongs to another model family)",
            "connect the VAE that belongs to this checkpoint (its own VAE output of Load Checkpoint), and cache "
            "the latents again"))
    width = getattr(host, "context_width", None)
    if width:
        try:
            item = host.encode_text([""], cfg.clip_skip if isinstance(cfg.clip_skip, int) else 1)[0]
            got = int(item["context"].shape[-1])
            if got != int(width):
                problems.append(Problem(
                    "CLIP", f"the text encoder gives {got}-wide text embeddings but this model cross-attends to "
                    f"{width}-wide ones (the CLIP belongs to another model family)",
                    "connect the CLIP output of the same Load Checkpoint as the MODEL"))
        except TrainingError as e:
            problems.append(Problem("CLIP", str(e).rstrip("."), "connect the CLIP output of Load Checkpoint"))
        except Exception:  # noqa: BLE001 - a host without text encoding: nothing to compare
            pass
    net = cfg.network
    if net.train_text_encoder:
        try:
            encoders = host.text_encoders()
        except Exception:  # noqa: BLE001
            encoders = {}
        if not encoders:
            problems.append(Problem("network.train_text_encoder", "it is on but no text encoder is available",
                                    "connect the CLIP, or turn train_text_encoder off"))
    if _bad_int(net.rank, 1) or _bad_int(net.conv_rank, 0) or net.targets not in _choices()["network.targets"]:
        return problems  # already reported; targets would only repeat it
    try:
        targets = host.adapter_targets(net.targets, net.conv_rank > 0, net.train_text_encoder)
    except TrainingError as e:
        problems.append(Problem("network", str(e).rstrip("."), "see the message"))
        return problems
    except Exception as e:  # noqa: BLE001
        problems.append(Problem("network.targets", f"the model's adapter targets cannot be listed ({e})",
                                f"choose other targets ({', '.join(_choices()['network.targets'])})"))
        return problems
    if not targets:
        problems.append(Problem("network.targets", f"{net.targets!r} finds no layer to train in this model",
                                "choose 'transformer' (or 'full')"))
        return problems
    if net.algorithm not in _choices()["network.algorithm"] or (net.algorithm == "lokr" and (
            _bad_int(net.lokr_factor, -1) or net.lokr_factor == 0)):
        return problems  # already reported; the layouts need a valid algorithm
    from ..adapters.algorithms import NAMES
    from ..adapters.targets import is_conv3x3
    from .memory import target_layout, target_rank

    # the rank limit per layer is the algorithm's: LoRA, LoHa, DoRA min(in, out); LoKr its large Kronecker factor
    too_big: dict[str, list[tuple[str, str, int, int]]] = {}
    for t in targets:
        rank = target_rank(t.module, net)
        lay = target_layout(t.module, rank, net)
        if not lay.fits():
            setting = "network.conv_rank" if is_conv3x3(t.module) and net.conv_rank > 0 else "network.rank"
            too_big.setdefault(setting, []).append((t.name, lay.limit_reason, lay.limit, rank))
    for setting, layers in too_big.items():
        rank = layers[0][3]
        limit = min(limit for _, _, limit, _ in layers)
        named = "; ".join(f"{n} ({why})" for n, why, _, _ in layers[:MAX_LISTED])
        more = f"; and {len(layers) - MAX_LISTED} more" if len(layers) > MAX_LISTED else ""
        other = (f", turn on {setting_ref('network.lokr_full_matrix')}, or change {setting_ref('network.lokr_factor')}"
                 if net.algorithm == "lokr" else "")
        problems.append(Problem(setting, f"{rank} is larger than {len(layers)} target layer(s) allow for "
                                f"{NAMES[net.algorithm]}: {named}{more}",
                                f"lower {setting} to {limit} or less{other}, or choose targets without these layers"))
    return problems


def count_images(folder: Path, limit: Optional[int] = None) -> int:
    """Image files under ``folder`` (hidden files/folders skipped, as the dataset scan does)."""
    count = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        for name in filenames:
            if not name.startswith(".") and is_image_file(name):
                count += 1
                if limit is not None and count >= limit:
                    return count
    return count


def check_dataset(dataset_cfg: Optional[DatasetConfig]) -> tuple[list[Problem], int]:
    """(problems, number of image files) for the dataset folder; the dataset module's own messages when present."""
    if dataset_cfg is None:
        return [], 0
    problems: list[Problem] = []
    folder = dataset_cfg.folder
    fix_folder = "set dataset.folder to a folder of images (with .txt captions next to them)"
    try:
        root = _existing_folder(folder)
    except TrainingError as e:
        root = None
        problems.append(Problem("dataset.folder", str(e).rstrip("."), fix_folder))
    images = 0
    if root is not None:
        images = count_images(root)
        if images == 0:
            problems.append(Problem("dataset.folder", f"'{root}' has no images (looked for "
                                    f"{', '.join(sorted(IMAGE_EXTENSIONS))}, sub-folders included)",
                                    "put the training images in that folder or choose another one"))
    if not _is_number(dataset_cfg.caption_dropout) or not (0 <= dataset_cfg.caption_dropout < 1):
        problems.append(Problem("dataset.caption_dropout", f"{dataset_cfg.caption_dropout!r} must be in [0, 1)",
                                "use 0 (off) or 0.05-0.1"))
    if _bad_int(dataset_cfg.default_repeats, 1):
        problems.append(Problem("dataset.default_repeats", f"{dataset_cfg.default_repeats!r} must be >= 1",
                                "use 1 (or a kohya 'N_name' sub-folder)"))
    if _bad_int(dataset_cfg.keep_tokens, 0):
        problems.append(Problem("dataset.keep_tokens", f"{dataset_cfg.keep_tokens!r} must be >= 0", "use 0 or 1"))
    return problems, images


def _writable(folder: Path) -> Optional[str]:
    """None when a file can be created in ``folder`` (created if missing), else the reason."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".loralab-write-test-", delete=True) as f:
            f.write(b"ok")
            f.flush()
        return None
    except OSError as e:
        return e.strerror or str(e)


def _existing_ancestor(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def output_bytes(host, cfg: TrainConfig) -> dict[str, int]:
    """Disk the run writes: the LoRA file(s) and the resume snapshots kept (adapters + optimizer state + EMA)."""
    from .memory import optimizer_state_bytes, target_layout, target_rank

    net = cfg.network
    try:
        targets = host.adapter_targets(net.targets, net.conv_rank > 0, net.train_text_encoder)
    except Exception:  # noqa: BLE001 - already reported by check_model
        return {}
    n = 0
    for t in targets:
        rank = target_rank(t.module, net)
        try:
            lay = target_layout(t.module, rank, net)  # the algorithm's own tensors
        except Exception:  # noqa: BLE001 - an invalid algorithm setting: already reported by check_settings
            return {}
        if rank > 0 and lay.fits():
            n += lay.param_count()
    out_elem = {"fp32": 4}.get(cfg.output_dtype, 2)
    lora = n * out_elem + SAFETENSORS_OVERHEAD
    try:
        opt = optimizer_state_bytes(cfg.optimizer.name, n)
    except Exception:  # noqa: BLE001
        opt = 8 * n
    snapshot = 4 * n + opt + (4 * n if cfg.ema_decay > 0 else 0) + SAFETENSORS_OVERHEAD
    saves = (cfg.steps // cfg.save_every if cfg.save_every else 0) + 1  # periodic + the final state
    kept = saves if cfg.keep_last <= 0 else min(cfg.keep_last, saves)
    files = 2 if cfg.ema_decay > 0 else 1  # the LoRA, and its EMA twin
    return {"LoRA files": lora * files, "resume snapshots": snapshot * (kept + 1)}  # +1: the one being written


def check_folders(host, cfg: TrainConfig, bucket_cfg: Optional[BucketConfig], output_dir, cache_dir,
                  images: int, expected_output_bytes: Optional[int]) -> list[Problem]:
    """Both folders writable (a temp file is created and removed); their disk(s) hold what the run writes."""
    problems: list[Problem] = []
    disks: dict[int, tuple[Path, dict[str, int], list[str]]] = {}
    for setting, folder in (("output folder", output_dir), ("cache folder", cache_dir)):
        if folder is None:
            continue
        folder = Path(folder).expanduser()
        reason = _writable(folder)
        if reason is not None:
            problems.append(Problem(setting, f"cannot write to '{folder}' ({reason})",
                                    "choose a folder you can write to, or fix its permissions"))
            continue
        if setting == "output folder":
            parts = {"outputs": int(expected_output_bytes)} if expected_output_bytes is not None \
                else output_bytes(host, cfg)
        else:
            parts = {}
            if images and bucket_cfg is not None and bucket_cfg.resolutions:
                channels = int(getattr(host, "latent_channels", 4) or 4)
                per_image = sum(channels * (res // LATENT_FACTOR) ** 2 * 4  # float32 cache entries
                                for res in bucket_cfg.resolutions if isinstance(res, int) and res > 0)
                parts["latent cache"] = images * per_image * (2 if bucket_cfg.flip else 1)
        _, total, settings = disks.setdefault(os.stat(folder).st_dev, (folder, {}, []))
        settings.append(setting)
        for k, v in parts.items():
            total[k] = total.get(k, 0) + int(v)
    from .memory import fmt_bytes

    for folder, parts, settings in disks.values():
        need = sum(parts.values())
        if need <= 0:
            continue
        free = shutil.disk_usage(_existing_ancestor(folder)).free
        if need * (1 + DISK_MARGIN) > free:
            detail = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in parts.items())
            problems.append(Problem(
                " and ".join(settings), f"the disk of '{folder}' has {fmt_bytes(free)} free but this run writes "
                f"about {fmt_bytes(need)} ({detail})",
                "free disk space, choose a folder on another disk, or lower keep_last / save_every"))
    return problems


def check_resume(host, cfg: TrainConfig, resume_dir, identity=None) -> list[Problem]:
    """The resume folder exists, has a snapshot, and (given the run's identity) holds the same model and settings."""
    if resume_dir is None or str(resume_dir).strip() == "":
        return []
    from ..training.state import check_resumable, latest_snapshot

    folder = Path(resume_dir).expanduser()
    if not folder.is_dir():
        return [Problem("resume_from", f"'{folder}' does not exist", "give the run folder of an earlier run (it "
                        "holds state/step_*), or leave resume_from empty to start a new run")]
    snapshot = latest_snapshot(folder)
    if snapshot is None:
        return [Problem("resume_from", f"'{folder}' has no saved state (state/step_*) to resume",
                        "a new run starts there; give another run folder to continue one", level="warning")]
    import json

    try:
        meta = json.loads((snapshot / "meta.json").read_text())
    except (OSError, ValueError) as e:
        return [Problem("resume_from", f"'{snapshot}' is damaged ({e})",
                        "delete that snapshot folder to resume from the one before it")]
    if identity is None:
        return []
    try:
        notes = check_resumable(meta, identity, snapshot)
    except TrainingError as e:
        head, _, fix = str(e).partition("; ")
        return [Problem("resume_from", head, fix or "start a new run")]
    return [Problem("resume_from", note, "nothing to do if that is what you want", level="warning") for note in notes]


def preflight(host, cfg: TrainConfig, dataset_cfg: Optional[DatasetConfig], bucket_cfg: Optional[BucketConfig], *,
              latent_channels_from_vae: Optional[int], output_dir, cache_dir, resume_dir=None,
              expected_output_bytes: Optional[int] = None, identity=None, preview_every: int = 0) -> list[Problem]:
    """Every check, every problem (errors and warnings). Pass ``dataset_cfg=None`` when the latents are already
    cached (the folder was checked when they were made), ``output_dir``/``cache_dir`` None to skip those;
    ``preview_every`` is the preview cadence when the front-end renders previews (0: none)."""
    import torch

    device_type = torch.device(getattr(host, "device", "cpu")).type
    problems = check_settings(cfg, bucket_cfg, device_type)
    problems += check_self_defeating(cfg, bucket_cfg, device_type, getattr(host, "family", None), preview_every)
    problems += check_model(host, cfg, latent_channels_from_vae)
    problems += check_objective_for_model(cfg, getattr(getattr(host, "schedule", None), "prediction", None))
    dataset_problems, images = check_dataset(dataset_cfg)
    problems += dataset_problems
    problems += check_folders(host, cfg, bucket_cfg, output_dir, cache_dir, images, expected_output_bytes)
    problems += check_resume(host, cfg, resume_dir, identity)
    return problems
