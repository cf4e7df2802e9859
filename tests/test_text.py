"""Text conditioning: captions as written are disk-cached; shuffled variants live only in a bounded LRU."""
from __future__ import annotations

import random
import zlib
from pathlib import Path

import torch
from shapes import write_shape_dataset

from trainer.config import DatasetConfig
from trainer.data.captions import build_caption
from trainer.data.text import VARIANT_LRU_ITEMS, TextEmbeddings

TAGS = ["red", "round", "small", "shiny", "wooden", "old", "striped", "tall"]


class FakeTextHost:
    """Deterministic per-string embeddings, so a cached one can be compared with a fresh encode."""

    text_encoder_id = "fake-te"

    def __init__(self):
        self.texts: list[str] = []

    def encode_text(self, captions, clip_skip=1):
        self.texts += list(captions)
        return [self.embed(c) for c in captions]

    @staticmethod
    def embed(caption: str) -> dict:
        gen = torch.Generator().manual_seed(zlib.crc32(caption.encode()))
        return {"context": torch.randn(77, 8, generator=gen), "pooled": torch.randn(4, generator=gen)}


def as_written(count: int) -> list[str]:
    rng = random.Random(1)
    return [f"ohwx, image {i}, " + ", ".join(rng.sample(TAGS, 5)) for i in range(count)]


def cache_files(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.safetensors")) if folder.exists() else 0


def test_shuffled_variants_stay_off_disk_and_in_a_bounded_lru(tmp_path):
    host, captions = FakeTextHost(), as_written(6)
    cfg = DatasetConfig(shuffle_captions=True, keep_tokens=1, caption_dropout=0.1, trigger_word="ohwx")
    text = TextEmbeddings(host, 1, tmp_path / "text", trainable=False)
    text.prefetch(captions + [""])  # what the loop does before training
    assert cache_files(tmp_path / "text") == len(captions) + 1
    rng = random.Random(0)
    drawn = set()
    for _ in range(400):
        batch = [build_caption(c, cfg, rng) for c in rng.sample(captions, 2)]
        drawn.update(batch)
        context, pooled = text(batch)
        fresh = [FakeTextHost.embed(c) for c in batch]  # the embeddings are still the right ones
        assert torch.equal(context, torch.stack([f["context"] for f in fresh]))
        assert torch.equal(pooled, torch.stack([f["pooled"] for f in fresh]))
        assert len(text.variants) <= VARIANT_LRU_ITEMS
    assert len(drawn) > 4 * VARIANT_LRU_ITEMS  # the run really drew more variants than the LRU holds
    assert cache_files(tmp_path / "text") == len(captions) + 1  # only the as-written captions and ""
    assert set(text.memory) == set(captions) | {""}


def test_as_written_captions_are_encoded_once_and_variants_reuse_lru_hits(tmp_path):
    host = FakeTextHost()
    text = TextEmbeddings(host, 1, tmp_path / "text", trainable=False, variant_items=2)
    text.prefetch(["a, b", ""])
    text(["a, b", "", "b, a"])  # as written from RAM; the variant encoded once
    text(["b, a", "b, a"])  # an LRU hit, no encode
    assert host.texts == ["", "a, b", "b, a"]
    text(["x", "y", "z"])  # three new variants in one call: all returned although the LRU holds two
    assert list(text.variants) == ["y", "z"] and host.texts[-3:] == ["x", "y", "z"]
    again = TextEmbeddings(FakeTextHost(), 1, tmp_path / "text", trainable=False)
    again.prefetch(["a, b", ""])  # a new run: as written comes from disk
    assert again.host.texts == []


def test_real_text_encoder_shuffled_embeddings_equal_a_fresh_encode(tiny_models, tmp_path):
    from trainer.hosts.diffusers_host import DiffusersHost

    host = DiffusersHost(tiny_models("sd15"))
    captions = as_written(3)
    cfg = DatasetConfig(shuffle_captions=True, keep_tokens=1)
    text = TextEmbeddings(host, 1, tmp_path / "text", trainable=False, variant_items=4)
    text.prefetch(captions)
    rng = random.Random(0)
    with torch.no_grad():
        for _ in range(12):
            batch = [build_caption(c, cfg, rng) for c in captions]
            context, _ = text(batch)
            fresh = torch.stack([item["context"] for item in host.encode_text(batch)])
            assert torch.allclose(context, fresh, atol=1e-6)
    assert cache_files(tmp_path / "text") == len(captions) and len(text.variants) <= 4


def test_a_shuffled_training_run_writes_only_as_written_captions(tiny_models, make_latents, tmp_path):
    from trainer.config import TrainConfig
    from trainer.hosts.diffusers_host import DiffusersHost
    from trainer.training.loop import train

    captions = [f"shape {i}, " + ", ".join(TAGS[i:i + 4]) for i in range(4)]
    host = DiffusersHost(tiny_models("sd15"))
    latents, dataset_cfg = make_latents(host, write_shape_dataset(tmp_path / "data", 4, captions=captions),
                                        shuffle_captions=True, caption_dropout=0.2)
    cfg = TrainConfig.from_dict({"steps": 12, "batch_size": 2, "network": {"rank": 2, "alpha": 2}})
    train(host, latents, cfg, tmp_path / "run", dataset_cfg=dataset_cfg, text_cache_dir=tmp_path / "text")
    assert cache_files(tmp_path / "text") == len(captions) + 1  # + the empty caption of dropout


def test_per_sample_hosts_get_each_entry_and_rows_padded_to_the_longest_not_repeated():
    """A DiT host reads each caption's own entry; the batch rows are zero-padded to the longest context, never
    repeated to a common multiple (co-prime unpadded lengths 37 and 41 would make 1517 tokens a row)."""
    from trainer.data.cache import LatentSample
    from trainer.training.loop import SampleRng, collate

    class PerSampleHost(FakeTextHost):
        family, per_sample_conditioning = "flux_dev", True

        @staticmethod
        def embed(caption):
            return {"context": torch.full((37 if caption == "short" else 41, 8), float(len(caption))),
                    "extra.attention_mask": torch.ones(37 if caption == "short" else 41)}

        def scale_latents(self, x):
            return x

    host = PerSampleHost()
    text = TextEmbeddings(host, 1, None, trainable=False)
    batch = [LatentSample(torch.zeros(4, 2, 2), None, caption, 1, (16, 16), 16, (16, 16), (0, 0), None, caption)
             for caption in ("short", "longer")]
    _, cond = collate(host, batch, text, DatasetConfig(), [SampleRng.keyed(i) for i in range(2)], "cpu")
    assert cond.context.shape == (2, 41, 8)
    assert torch.equal(cond.context[0, 37:], torch.zeros(4, 8)) and torch.equal(cond.context[1], host.embed("longer")["context"])
    assert [s["context"].shape[0] for s in cond.samples] == [37, 41]
    assert torch.equal(cond.samples[0]["extra.attention_mask"], torch.ones(37))
