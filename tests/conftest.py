"""Shared fixtures: tiny random diffusers models and small real image datasets, built once per session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Tiny models are dominated by threading overhead; one thread is faster and steadier on a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Folders of tiny SD1.5 (eps and v) and SDXL models, built on first use."""
    from trainer.demo.tiny_models import build_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny_models")
    built = {}

    def get(family: str = "sd15", prediction: str = "epsilon") -> Path:
        key = (family, prediction)
        if key not in built:
            built[key] = build_tiny_pipeline(root / f"{family}_{prediction}", family, prediction)
        return built[key]

    return get


@pytest.fixture
def make_latents(tmp_path):
    """Scan a dataset folder and cache its latents with a host's VAE: the real data path, made small."""
    from trainer.config import BucketConfig, DatasetConfig
    from trainer.data.cache import prepare_latents
    from trainer.data.dataset import scan_dataset

    def make(host, folder: Path, resolution: int = 64, flip: bool = False, **dataset_kwargs):
        dataset_cfg = DatasetConfig(folder=str(folder), **dataset_kwargs)
        buckets = BucketConfig(resolutions=[resolution], min_bucket=32, max_bucket=resolution * 2, step=32, flip=flip)
        dataset = scan_dataset(dataset_cfg)
        latents = prepare_latents(dataset, buckets, host.encode_images, host.image_encoder_id, tmp_path / "cache")
        return latents, dataset_cfg

    return make
