"""Flow families with their own (tiny) text encoders: captions are cached as the encoder returns them (half
precision, no padding added, extras such as attention masks kept), and a batch of captions of different lengths
conditions each sample exactly as that sample alone (the per-sample extra_conds path: Lumina2 counts its own tokens,
Chroma's unpadded T5 keeps its own length)."""
from __future__ import annotations

import importlib

import pytest
import torch

try:
    from . import tiny_flow
except ImportError:
    import tiny_flow  # type: ignore[no-redef]

pytestmark = pytest.mark.comfy

WITH_ENCODERS = ["flux_dev", "chroma", "lumina2", "wan21", "auraflow"]
CAPTIONS = ["a cat", "a red square on green grass under a wide blue sky, photographed at noon in summer"]


@pytest.fixture
def pack(loralab_pack):
    return lambda name: importlib.import_module(f"loralab_pack.{name}")


@pytest.mark.parametrize("family", WITH_ENCODERS)
def test_batch_conditions_each_sample_as_alone(pack, comfy, tmp_path, family):
    model, clip = tiny_flow.build_model(family), tiny_flow.build_text_encoder(family)
    host = pack("nodes.comfy_host").ComfyHost(model.clone(), clip)
    items = host.encode_text(CAPTIONS)
    assert all(item["context"].dtype == torch.float16 for item in items)  # compact cache entries
    direct = clip.encode_from_tokens(clip.tokenize(CAPTIONS[1]), return_dict=True)
    assert items[1]["context"].shape == direct["cond"][0].shape  # nothing padded or cut
    for key, value in direct.items():
        if key not in ("cond", "pooled_output") and torch.is_tensor(value):
            assert torch.equal(items[1][f"extra.{key}"], value[0])

    text = pack("trainer.data.text").TextEmbeddings(host, 1, tmp_path / "text", trainable=False)
    text.prefetch(CAPTIONS)
    again = pack("trainer.data.text").TextEmbeddings(host, 1, tmp_path / "text", trainable=False)
    again.prefetch(CAPTIONS)
    assert again.encoded == 0  # the disk cache holds the extras too
    edited = pack("trainer.data.text").TextEmbeddings(host, 1, tmp_path / "text", trainable=False)
    edited.prefetch([CAPTIONS[0], CAPTIONS[1] + ", edited"])
    assert edited.encoded == 1  # editing one caption re-encodes that caption only
    Conditioning = pack("trainer.hosts.base").Conditioning
    spec = tiny_flow.FAMILIES[family]
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(tiny_flow.latent_shape(family, batch=2), generator=g)
    sigma = torch.tensor([0.3, 0.8])
    batch_items = again.items(CAPTIONS)
    context, pooled = again(CAPTIONS)
    with torch.no_grad():
        both = host.predict(noisy, sigma, Conditioning(context, pooled, None, batch_items)).float()
        for i in range(2):
            alone = host.predict(noisy[i:i + 1], sigma[i:i + 1],
                                 Conditioning(context[i:i + 1], None, None, [batch_items[i]])).float()
            torch.testing.assert_close(both[i:i + 1], alone, atol=1e-4, rtol=1e-4)
    assert spec.latent_dims in (2, 3)


def test_flux_trains_with_its_text_encoder_loaded_like_dualcliploader(pack, comfy, tmp_path):
    """DualCLIPLoader's path (separate CLIP-L and T5 files) through the real text cache and the loop."""
    model, clip = tiny_flow.build_model("flux_dev"), tiny_flow.build_flux_text_encoder_from_files()
    host = pack("nodes.comfy_host").ComfyHost(model.clone(), clip)
    cache = pack("trainer.data.cache")
    g = torch.Generator().manual_seed(1)
    samples = [cache.LatentSample(torch.randn(16, 8, 8, generator=g), None, caption, 1, (64, 64), 64, (64, 64),
                                  (0, 0), None, f"mem://{i}") for i, caption in enumerate(CAPTIONS)]
    cfg = pack("trainer.config").TrainConfig.from_dict({"steps": 3, "batch_size": 2, "network": {"rank": 4}})
    result = pack("trainer.training.loop").train(host, cache.LatentSet(samples, report=None), cfg, tmp_path / "run",
                                                  text_cache_dir=tmp_path / "text")
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
