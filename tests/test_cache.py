"""Latent and text caches: content-addressed, resumable, self-repairing; hits neither decode nor encode."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import trainer.data.cache as cache_module
from tests.messy import build_messy_folder, encoded, photo_like, tiny_vae_encoder
from trainer.config import BucketConfig, DatasetConfig
from trainer.data.cache import EntryStore, TextCache, prepare_latents, text_key
from trainer.data.dataset import DatasetError, scan_dataset
from trainer.errors import TrainingInterrupted

# Small buckets keep the CPU VAE cheap; the bucket logic itself is tested at real sizes in test_buckets.py.
SMALL = BucketConfig(resolutions=[128], min_bucket=64, max_bucket=256, step=32)
SIZES = [(160, 120), (120, 160), (128, 128), (200, 100), (150, 150), (100, 200), (165, 125)]


def make_set(folder, sizes=SIZES):
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        photo_like(w, h, seed=i).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"caption {i}, tag a, tag b")
    return scan_dataset(DatasetConfig(folder=str(folder)))


def entry_files(cache_dir):
    return sorted(cache_dir.rglob("*.safetensors"))


@pytest.fixture()
def encoder():
    return tiny_vae_encoder()


def test_messy_folder_caches_every_usable_image(tmp_path, encoder):
    messy = build_messy_folder(tmp_path / "data")
    ds = scan_dataset(DatasetConfig(folder=str(messy.root), trigger_word="ohwx"), min_size=256)
    cfg = BucketConfig(resolutions=[128], min_bucket=64, max_bucket=256, step=32, flip=True)
    out = prepare_latents(ds, cfg, encoder, "tiny-vae", tmp_path / "cache", batch_size=4)
    assert {s.image_path for s in out.samples} == {i.path for i in ds.items}
    assert out.stats.failed == [] and out.stats.hits == 0
    assert out.stats.encoded == 2 * (len(ds.items) - 1)  # the duplicate pair shares its entries
    for s in out.samples:
        assert s.latent.shape == (4, s.bucket[1] // 8, s.bucket[0] // 8) and s.latent.dtype == torch.float32
        assert s.latent_flipped.shape == s.latent.shape
        top, left = s.crop_top_left_flipped
        assert top == s.crop_top_left[0] and left >= 0
    good = next(s for s in out.samples if s.image_path.endswith("good.png"))
    assert not torch.equal(good.latent, good.latent_flipped)
    huge = next(s for s in out.samples if s.image_path.endswith("huge.jpg"))
    assert huge.original_size == (4000, 6000) and huge.bucket == (160, 96)
    assert huge.size_ids() == (4000, 6000, *huge.crop_top_left, 96, 160)
    assert "Buckets:" in out.report.to_text() and "0 failed" in out.report.to_text()
    json.dumps(out.report.to_dict())


def test_second_pass_encodes_nothing_and_decodes_nothing(tmp_path, encoder, monkeypatch):
    ds = make_set(tmp_path / "data")
    first = prepare_latents(ds, SMALL, encoder, "vae", tmp_path / "cache", batch_size=3)
    assert first.stats.encoded == len(SIZES) and encoder.images == len(SIZES)
    encoder.images = 0

    def no_decoding(*a, **k):
        raise AssertionError("a cache hit decoded an image")

    monkeypatch.setattr(cache_module, "load_image", no_decoding)
    second = prepare_latents(ds, SMALL, encoder, "vae", tmp_path / "cache", batch_size=3)
    assert encoder.images == 0 and second.stats.encoded == 0 and second.stats.hits == len(SIZES)
    for a, b in zip(first.samples, second.samples):
        assert torch.equal(a.latent, b.latent) and a.bucket == b.bucket and a.crop_top_left == b.crop_top_left


def test_batches_hold_one_bucket_and_at_most_batch_size(tmp_path):
    ds = make_set(tmp_path / "data", SIZES * 2)
    shapes = []
    base = tiny_vae_encoder()

    def recording(images):
        shapes.append(tuple(images.shape))
        return base(images)

    out = prepare_latents(ds, SMALL, recording, "vae", tmp_path / "cache", batch_size=3)
    assert sum(s[0] for s in shapes) == out.stats.encoded == 2 * len(SIZES)
    assert all(s[0] <= 3 for s in shapes)
    assert len(shapes) == sum(-(-n // 3) for _, _, n, _ in out.report.buckets.rows)  # full batches per bucket


def test_editing_one_image_reencodes_exactly_one_entry(tmp_path, encoder):
    ds = make_set(tmp_path / "data")
    prepare_latents(ds, SMALL, encoder, "vae", tmp_path / "cache")
    photo_like(160, 120, seed=99).save(tmp_path / "data" / "img0.png")
    (tmp_path / "data" / "img3.txt").write_text("a new caption")  # captions are not part of latent keys
    encoder.images = 0
    again = prepare_latents(scan_dataset(DatasetConfig(folder=str(tmp_path / "data"))), SMALL, encoder, "vae",
                            tmp_path / "cache")
    assert encoder.images == 1 and again.stats.encoded == 1 and again.stats.hits == len(SIZES) - 1
    assert next(s for s in again.samples if s.image_path.endswith("img3.png")).caption == "a new caption"


def test_key_covers_encoder_dtype_flip_and_crop(tmp_path, encoder):
    ds = make_set(tmp_path / "data", SIZES[:3])
    cache = tmp_path / "cache"
    prepare_latents(ds, SMALL, encoder, "vae", cache)
    assert prepare_latents(ds, SMALL, encoder, "other-vae", cache).stats.encoded == 3
    half = prepare_latents(ds, SMALL, encoder, "vae", cache, dtype="float16")
    assert half.stats.encoded == 3 and half.samples[0].latent.dtype == torch.float16
    flip = BucketConfig(resolutions=[128], min_bucket=64, max_bucket=256, step=32, flip=True)
    assert prepare_latents(ds, flip, encoder, "vae", cache).stats.encoded == 3  # only the flipped variants
    random_crop = BucketConfig(resolutions=[128], min_bucket=64, max_bucket=256, step=32, crop="random")
    assert prepare_latents(ds, random_crop, encoder, "vae", cache).stats.encoded == 2  # 128x128 has nothing to cut
    assert prepare_latents(ds, SMALL, encoder, "vae", cache).stats.hits == 3


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape", "missing_tensor", "foreign_key"])
def test_damaged_entry_is_detected_and_rebuilt(tmp_path, encoder, damage):
    ds = make_set(tmp_path / "data", SIZES[:3])
    cache = tmp_path / "cache"
    first = prepare_latents(ds, SMALL, encoder, "vae", cache)
    victim = entry_files(cache)[0]
    key = victim.stem
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif damage == "garbage":
        victim.write_bytes(b"\x00" * 64)
    elif damage == "wrong_shape":
        save_file({"latent": torch.zeros(4, 3, 3)}, str(victim), metadata={"key": key})
    elif damage == "missing_tensor":
        save_file({"other": torch.zeros(4, 16, 16)}, str(victim), metadata={"key": key})
    else:
        save_file({"latent": torch.zeros(4, 16, 16)}, str(victim), metadata={"key": "something else"})
    encoder.images = 0
    again = prepare_latents(ds, SMALL, encoder, "vae", cache)
    assert again.stats.rebuilt == 1 and again.stats.encoded == 1 and encoder.images == 1
    for a, b in zip(first.samples, again.samples):  # batch composition may change the last float bits
        assert torch.allclose(a.latent, b.latent, atol=1e-5)
    assert prepare_latents(ds, SMALL, encoder, "vae", cache).stats.hits == 3


def test_interrupted_pass_resumes_where_it_stopped(tmp_path, encoder):
    ds = make_set(tmp_path / "data", SIZES * 2)
    total = len(ds.items)
    calls = {"n": 0}

    def stop_after_two_batches():
        calls["n"] += 1
        if calls["n"] == 2:
            raise TrainingInterrupted()

    with pytest.raises(TrainingInterrupted):
        prepare_latents(ds, SMALL, encoder, "vae", tmp_path / "cache", batch_size=2,
                        check_interrupt=stop_after_two_batches)
    written = len(entry_files(tmp_path / "cache"))
    assert written == encoder.images == 4  # two batches of two, each written as soon as it was encoded
    progress = []
    again = prepare_latents(ds, SMALL, encoder, "vae", tmp_path / "cache", batch_size=2,
                            progress=lambda done, total: progress.append((done, total)))
    assert again.stats.hits == written and again.stats.encoded == total - written
    assert encoder.images == total  # nothing encoded twice across the two passes
    assert progress[0] == (0, total - written) and progress[-1] == (total - written, total - written)


def test_files_failing_at_cache_time_are_skipped_and_reported(tmp_path, encoder):
    ds = make_set(tmp_path / "data", SIZES[:4])
    (tmp_path / "data" / "img1.png").unlink()  # gone since the scan
    data = (tmp_path / "data" / "img2.png").read_bytes()
    (tmp_path / "data" / "img2.png").write_bytes(data[: len(data) // 2])  # damaged since the scan
    out = prepare_latents(ds, SMALL, encoder, "vae", tmp_path / "cache")
    failed = {path.rsplit("/", 1)[-1]: reason for path, reason in out.stats.failed}
    assert set(failed) == {"img1.png", "img2.png"}
    assert "cannot read" in failed["img1.png"] and "changed since the dataset was scanned" in failed["img2.png"]
    assert len(out.samples) == 2 and "img2.png" in out.report.to_text()


def test_nan_latents_are_reported_not_cached(tmp_path, encoder):
    ds = make_set(tmp_path / "data", SIZES[:2])

    def first_call_nan(images):
        out = encoder(images)
        return out * float("nan") if encoder.calls == 1 else out

    out = prepare_latents(ds, SMALL, first_call_nan, "vae", tmp_path / "cache", batch_size=1)
    assert len(out.samples) == 1 and len(out.stats.failed) == 1 and "NaN" in out.stats.failed[0][1]
    assert len(entry_files(tmp_path / "cache")) == 1


def test_nothing_usable_at_cache_time_is_one_clear_error(tmp_path):
    ds = make_set(tmp_path / "data", SIZES[:2])

    def nan_encoder(x):
        return torch.full((x.shape[0], 4, x.shape[1] // 8, x.shape[2] // 8), float("nan"))

    with pytest.raises(DatasetError, match="NaN"):
        prepare_latents(ds, SMALL, nan_encoder, "vae", tmp_path / "cache")
    assert entry_files(tmp_path / "cache") == []


def test_several_resolutions_give_separate_samples(tmp_path, encoder):
    ds = make_set(tmp_path / "data", SIZES[:3])
    cfg = BucketConfig(resolutions=[128, 192], min_bucket=64, max_bucket=384, step=32)
    out = prepare_latents(ds, cfg, encoder, "vae", tmp_path / "cache")
    assert sorted(s.resolution for s in out.samples) == [128] * 3 + [192] * 3
    for s in out.samples:
        assert s.bucket[0] * s.bucket[1] <= s.resolution ** 2
    assert {r for r, _, _, _ in out.report.buckets.rows} == {128, 192}


class CountingTextEncoder:
    def __init__(self):
        self.calls, self.texts = 0, []

    def __call__(self, captions):
        self.calls += 1
        self.texts += list(captions)
        return [{"context": torch.full((77, 8), float(len(c))), "pooled": torch.full((4,), float(len(c)))}
                for c in captions]


def test_text_cache_encodes_only_distinct_misses_in_one_call(tmp_path):
    enc = CountingTextEncoder()
    cache = TextCache(tmp_path / "text")
    out = cache.get_or_encode(["a dog", "a cat", "a dog", ""], enc, "te", clip_skip=1)
    assert enc.calls == 1 and enc.texts == ["a dog", "a cat", ""]
    assert [float(o["context"][0, 0]) for o in out] == [5, 5, 5, 0] and out[0]["pooled"].shape == (4,)
    fresh = TextCache(tmp_path / "text")  # a new process: from disk
    fresh.get_or_encode(["a dog", "a cat", ""], enc, "te", clip_skip=1)
    assert enc.calls == 1 and fresh.stats.hits == 3
    fresh.get_or_encode(["a dog"], enc, "te", clip_skip=2)  # clip skip is part of the key
    fresh.get_or_encode(["a dog"], enc, "te-2", clip_skip=1)  # so is the encoder
    assert enc.texts[-2:] == ["a dog", "a dog"]


def test_editing_one_caption_reencodes_exactly_one_text_entry(tmp_path):
    folder = tmp_path / "data"
    ds = make_set(folder, SIZES[:5])
    enc = CountingTextEncoder()
    TextCache(tmp_path / "text").get_or_encode([i.caption for i in ds.items], enc, "te")
    (folder / "img2.txt").write_text("an edited caption")
    ds = scan_dataset(DatasetConfig(folder=str(folder)))
    enc.texts = []
    TextCache(tmp_path / "text").get_or_encode([i.caption for i in ds.items], enc, "te")
    assert enc.texts == ["an edited caption"]


def test_damaged_text_entry_is_rebuilt(tmp_path):
    enc = CountingTextEncoder()
    TextCache(tmp_path / "text").get_or_encode(["x", "y"], enc, "te")
    path = EntryStore(tmp_path / "text").path(text_key("x", "te", 1))
    path.write_bytes(path.read_bytes()[:40])
    cache = TextCache(tmp_path / "text")
    out = cache.get_or_encode(["x", "y"], enc, "te")
    assert enc.texts == ["x", "y", "x"] and cache.stats.rebuilt == 1 and out[0]["context"].shape == (77, 8)
    assert np.isclose(float(out[0]["context"][0, 0]), 1.0)


def test_hit_for_a_jpeg_costs_no_decode_even_for_a_huge_one(tmp_path, encoder, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.jpg").write_bytes(encoded(photo_like(1500, 1000, 1), "JPEG"))
    ds = scan_dataset(DatasetConfig(folder=str(tmp_path / "data")))
    prepare_latents(ds, SMALL, encoder, "vae", tmp_path / "cache")
    monkeypatch.setattr(cache_module, "load_image", None)
    assert prepare_latents(ds, SMALL, encoder, "vae", tmp_path / "cache").stats.hits == 1
