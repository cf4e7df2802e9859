"""Weights ComfyUI created under inference mode (a checkpoint loaded on the CPU, or with --gpu-only) train without a
second copy of the UNet: the session swaps in ordinary tensors over the same memory and puts the originals back."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shapes import write_shape_dataset  # noqa: E402  (tests/shapes.py: real PNG files + captions)

try:
    from . import harness
except ImportError:
    import harness  # type: ignore[no-redef]

pytestmark = pytest.mark.comfy


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).clone()  # NaN-safe comparison


def test_inference_weights_train_without_a_copy_and_come_back_untouched(loralab_pack, comfy, tiny_checkpoints,
                                                                        tmp_path):
    pack = lambda name: importlib.import_module(f"loralab_pack.{name}")  # noqa: E731
    with torch.inference_mode():  # how ComfyUI runs Load Checkpoint
        model, clip, vae = harness.load_tiny(tiny_checkpoints["sd15"], te_layers=3)
    unet = model.model.diffusion_model
    params = {(id(m), n): p for m in unet.modules() for n, p in m._parameters.items() if p is not None}
    assert params and all(p.is_inference() for p in params.values())
    before = {k: (p, p.data_ptr(), _bits(p)) for k, p in params.items()}
    seen = {}

    class WatchingHost(pack("nodes.comfy_host").ComfyHost):
        def predict(self, *args, **kwargs):
            if not seen:  # inside the session: ordinary tensors on the very same memory
                now = {(id(m), n): p for m in self.unet.modules() for n, p in m._parameters.items() if p is not None}
                seen["inference"] = sum(p.is_inference() for p in now.values())
                seen["moved"] = [k for k, p in now.items() if p.data_ptr() != before[k][1]]
                seen["swapped"] = sum(p is not before[k][0] for k, p in now.items())
            return super().predict(*args, **kwargs)

    host = WatchingHost(model, clip, vae)
    config = pack("trainer.config")
    dataset_cfg = config.DatasetConfig(folder=str(write_shape_dataset(tmp_path / "data", 2)))
    buckets = config.BucketConfig(resolutions=[64], min_bucket=32, max_bucket=128, step=32)
    dataset = pack("trainer.data.dataset").scan_dataset(dataset_cfg)
    latents = pack("trainer.data.cache").prepare_latents(dataset, buckets, host.encode_images, host.image_encoder_id,
                                                         tmp_path / "cache")
    cfg = config.TrainConfig.from_dict({"steps": 3, "batch_size": 2, "seed": 0, "network": {"rank": 4, "alpha": 4},
                                        "optimizer": {"learning_rate": 1e-3}})
    result = pack("trainer.training.loop").train(host, latents, cfg, tmp_path / "run", dataset_cfg=dataset_cfg)

    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert seen["inference"] == 0 and seen["swapped"] == len(params)  # every weight was swapped for the run ...
    assert seen["moved"] == []  # ... onto the same memory: no second copy of the UNet
    after = {(id(m), n): p for m in unet.modules() for n, p in m._parameters.items() if p is not None}
    assert after.keys() == before.keys()
    assert all(after[k] is p for k, (p, _, _) in before.items())  # the very same tensor objects are back
    assert all(torch.equal(_bits(after[k]), bits) for k, (_, _, bits) in before.items())  # bit-identical
    ups = [t for k, t in result.network.kohya_state_dict().items() if "lora_up" in k]
    assert ups and any(float(t.abs().sum()) > 0 for t in ups)  # the adapters trained (they start at zero)
