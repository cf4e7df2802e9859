"""Where things live inside ComfyUI: dataset folders, LoRA files, run folders and caches."""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..trainer.errors import TrainingError

SAFE_PART = re.compile(r"[^A-Za-z0-9._ -]+")


def _folder_paths():
    import folder_paths

    return folder_paths


def resolve_dataset_folder(folder: str) -> Path:
    """An absolute path, or a sub-folder of ComfyUI's input folder."""
    text = (folder or "").strip().strip('"')
    if not text:
        raise TrainingError("Load Dataset: 'folder' is empty; give an absolute path or a sub-folder of "
                            f"ComfyUI's input folder ({_folder_paths().get_input_directory()})")
    path = Path(text).expanduser()
    if path.is_absolute():
        return path
    return Path(_folder_paths().get_input_directory()) / path


def loralab_root() -> Path:
    return Path(_folder_paths().get_output_directory()) / "loralab"


def runs_root() -> Path:
    """Run folders: ``$LORALAB_RUNS_ROOT`` when set (e.g. a faster disk), else ``<output>/loralab/runs``. Train LoRA
    and the live panel's routes both use this, so the panel always reads where training writes."""
    override = os.environ.get("LORALAB_RUNS_ROOT", "").strip()
    return Path(override).expanduser() if override else loralab_root() / "runs"


def default_cache_dir() -> Path:
    return loralab_root() / "cache"


def sanitize_name(name: str, fallback: str = "lora") -> str:
    """One path component: unsafe characters replaced, no dots at the start, never empty."""
    cleaned = SAFE_PART.sub("_", name).strip(" .")
    return cleaned[:120] or fallback


def loras_root() -> Path:
    """ComfyUI's first models/loras folder (where LoraLoader looks and LoRA Lab writes)."""
    return Path(_folder_paths().get_folder_paths("loras")[0]).resolve()


def lora_output_path(filename: str) -> Path:
    """A file under models/loras (sub-folders allowed), sanitised so it can never escape that folder."""
    root = loras_root()
    parts = [sanitize_name(p) for p in re.split(r"[\\/]+", filename or "") if p.strip() not in ("", ".", "..")]
    if not parts:
        parts = ["lora"]
    if not parts[-1].lower().endswith(".safetensors"):
        parts[-1] += ".safetensors"
    path = root.joinpath(*parts).resolve()
    if root not in path.parents:
        raise TrainingError(f"Save LoRA: file name '{filename}' would leave the loras folder ({root})")
    return path


def refresh_lora_list() -> None:
    """Drop ComfyUI's cached file list so LoraLoader shows a new file without restarting."""
    fp = _folder_paths()
    cache = getattr(fp, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.pop("loras", None)


def numbered_lora_folder(run_folder_name: str) -> Path:
    """Where Train LoRA writes a run's numbered LoRAs: ``models/loras/loralab/<run folder>/``, so LoraLoader lists
    every checkpoint of the run under the run's own name."""
    return loras_root() / "loralab" / sanitize_name(run_folder_name)


def counter_files(path: Path) -> list[Path]:
    """The files ``<name>_NNNNN_.safetensors`` beside ``path`` (ComfyUI's counter suffix), by number."""
    pattern = re.compile(re.escape(path.stem) + r"_(\d{5})_" + re.escape(path.suffix) + "$")
    found = [(int(m.group(1)), p) for p in (path.parent.iterdir() if path.parent.is_dir() else [])
             if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


def counter_path(path: Path) -> Path:
    """The next free ``<name>_NNNNN_.safetensors`` beside ``path``: one more than the highest number there."""
    taken = [int(p.name[len(path.stem) + 1:len(path.stem) + 6]) for p in counter_files(path)]
    counter = max(taken, default=0) + 1
    while (candidate := path.with_name(f"{path.stem}_{counter:05d}_{path.suffix}")).exists():
        counter += 1
    return candidate


def resolve_run_folder(text: str) -> Path:
    """A run folder: absolute, or a name under the runs folder (``runs_root``)."""
    path = Path((text or "").strip().strip('"')).expanduser()
    return path if path.is_absolute() else runs_root() / path
