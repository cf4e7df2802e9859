"""Datasets built in the graph: images without files (keyed by their pixels) and several datasets in one run, with
regularisation images whose loss carries their own weight through batching into the loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from shapes import write_shape_dataset

from tests.messy import photo_like, tiny_vae_encoder
from trainer.config import BucketConfig, DatasetConfig, TrainConfig
from trainer.data.cache import prepare_latents
from trainer.data.combine import REGULARIZATION, Part, combine
from trainer.data.dataset import DatasetError, scan_dataset
from trainer.data.graph_images import flatten_images, images_dataset, split_captions
from trainer.training.identity import data_digest
from trainer.training.loop import SampleRng, collate, per_sample_weights

BUCKETS = BucketConfig(resolutions=[64], min_bucket=32, max_bucket=128, step=32)


def comfy_image(width, height, seed):
    """A ComfyUI IMAGE: (1, H, W, 3) floats in [0, 1]."""
    pixels = np.asarray(photo_like(width, height, seed=seed), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).unsqueeze(0)


def test_captions_come_as_a_list_or_one_per_line():
    assert split_captions(["a cat", "a  dog\n"]) == ["a cat", "a dog"]
    assert split_captions(["a cat\r\na dog\n"]) == ["a cat", "a dog"]
    assert split_captions(["\nfirst\n\nthird\n"]) == ["first", "", "third"]  # an inner blank line: no caption
    assert split_captions([""]) is None and split_captions(None) is None and split_captions([]) is None


def test_a_batch_and_a_list_of_sizes_become_one_image_each():
    batch = torch.cat([comfy_image(64, 64, 0), comfy_image(64, 64, 1)])
    images = flatten_images([batch, comfy_image(96, 64, 2)])
    assert [im.shape for im in images] == [(64, 64, 3), (64, 64, 3), (64, 96, 3)]
    assert all(im.dtype == np.uint8 for im in images)
    rgba = flatten_images([torch.zeros(1, 8, 8, 4)])[0]  # fully transparent: white, as file datasets composite
    assert (rgba == 255).all()


def test_count_mismatch_is_one_clear_error():
    images = flatten_images([comfy_image(64, 64, 0), comfy_image(64, 64, 1), comfy_image(64, 64, 2)])
    with pytest.raises(DatasetError, match=r"3 image\(s\) but 2 caption\(s\).*one caption per image"):
        images_dataset(images, ["a", "b"], DatasetConfig())


def test_trigger_repeats_report_and_fingerprint_follow_pixels_and_captions():
    images = flatten_images([comfy_image(64, 64, 0), comfy_image(64, 64, 1)])
    cfg = DatasetConfig(trigger_word="ohwx", default_repeats=3)
    ds = images_dataset(images, ["a red square", ""], cfg, min_size=128)
    assert [i.caption for i in ds.items] == ["ohwx, a red square", "ohwx"]
    assert [i.repeats for i in ds.items] == [3, 3] and [i.captioned for i in ds.items] == [True, False]
    text = ds.report.to_text()
    assert "2 usable image(s), 1 with a caption, 6 sample(s) per epoch" in text
    assert "No caption (trained with the trigger word only) - 1:" in text and "image_002" in text
    assert "Smaller than 128x128" in text
    again = images_dataset(flatten_images([comfy_image(64, 64, 0), comfy_image(64, 64, 1)]), ["a red square", ""], cfg)
    assert again.fingerprint == ds.fingerprint
    assert images_dataset(images, ["a blue square", ""], cfg).fingerprint != ds.fingerprint
    changed = flatten_images([comfy_image(64, 64, 0), comfy_image(64, 64, 9)])
    assert images_dataset(changed, ["a red square", ""], cfg).fingerprint != ds.fingerprint


def test_cache_keys_follow_the_pixels(tmp_path):
    encoder = tiny_vae_encoder()
    cfg = DatasetConfig()
    first = images_dataset(flatten_images([comfy_image(64, 64, 0), comfy_image(96, 64, 1)]), None, cfg)
    out = prepare_latents(first, BUCKETS, encoder, "tiny", tmp_path / "cache")
    assert (out.stats.encoded, out.stats.hits) == (2, 0)
    assert [s.original_size for s in out.samples] == [(64, 64), (64, 96)]  # (h, w): each keeps its own size
    same = images_dataset(flatten_images([comfy_image(64, 64, 0), comfy_image(96, 64, 1)]), None, cfg)
    assert prepare_latents(same, BUCKETS, encoder, "tiny", tmp_path / "cache").stats.hits == 2
    one_changed = images_dataset(flatten_images([comfy_image(64, 64, 0), comfy_image(96, 64, 5)]), None, cfg)
    stats = prepare_latents(one_changed, BUCKETS, encoder, "tiny", tmp_path / "cache").stats
    assert (stats.hits, stats.encoded) == (1, 1)
    # the same pixels as a file hit nothing (a file is keyed by its bytes), but train the same latent
    folder = tmp_path / "files"
    folder.mkdir()
    photo_like(64, 64, seed=0).save(folder / "a.png")
    from_file = prepare_latents(scan_dataset(DatasetConfig(folder=str(folder))), BUCKETS, encoder, "tiny",
                                tmp_path / "cache")
    assert torch.allclose(from_file.samples[0].latent, out.samples[0].latent, atol=1e-5)  # batched apart


def make_parts(tmp_path):
    train = scan_dataset(DatasetConfig(folder=str(write_shape_dataset(tmp_path / "subject", 2)), trigger_word="ohwx",
                                       caption_dropout=1.0))
    reg = scan_dataset(DatasetConfig(folder=str(write_shape_dataset(tmp_path / "class", 2, seed=3)),
                                     default_repeats=2, shuffle_captions=True))
    return train, reg


def test_combined_parts_keep_their_options_weights_and_report(tmp_path):
    train, reg = make_parts(tmp_path)
    combined = combine([Part(train), Part(reg, 0.5, REGULARIZATION)])
    assert [i.loss_weight for i in combined.items] == [1.0, 1.0, 0.5, 0.5]
    assert [i.caption_options.caption_dropout for i in combined.items] == [1.0, 1.0, 0.0, 0.0]
    assert combined.config.shuffle_captions and combined.config.caption_dropout == 1.0
    assert combined.config.trigger_word == "ohwx"  # the training part's, for the file's metadata
    text = combined.report.to_text()
    assert "2 part(s), 4 image(s), 6 sample(s) per epoch" in text
    assert "training 2 / regularisation 4 sample(s) per epoch" in text
    assert "] train, loss weight 1" in text and "] regularization, loss weight 0.5" in text
    assert text.count("Dataset: ") == 2  # each part's own report

    latents = prepare_latents(combined, BUCKETS, tiny_vae_encoder(), "tiny", tmp_path / "cache")
    assert [s.loss_weight for s in latents.samples] == [1.0, 1.0, 0.5, 0.5]
    assert [s.repeats for s in latents.samples] == [1, 1, 2, 2]
    weights = per_sample_weights(latents.samples)
    assert weights.tolist() == [1.0, 1.0, 0.5, 0.5] and per_sample_weights(latents.samples[:2]) is None

    # each part's caption options apply to its own samples: the subject drops every caption, the class shuffles
    captured = []

    class Text:
        def __call__(self, captions):
            captured.extend(captions)
            return torch.zeros(len(captions), 77, 8), None

    class Host:
        family, per_sample_conditioning = "sd15", False

        def scale_latents(self, x):
            return x

    collate(Host(), latents.samples, Text(), combined.config, [SampleRng.keyed(i) for i in range(4)], "cpu")
    assert captured[:2] == ["", ""] and all(c for c in captured[2:])

    # the run's identity follows a part's weight
    other = prepare_latents(combine([Part(train), Part(reg, 1.0, REGULARIZATION)]), BUCKETS, tiny_vae_encoder(),
                            "tiny", tmp_path / "cache")
    assert data_digest(latents.samples, combined.config) != data_digest(other.samples, combined.config)


def test_regularisation_weight_scales_its_samples_loss_through_training(tiny_models, tmp_path):
    """Weight 0 on the class images: exactly the steps that drew one of them have loss 0 (batch 1)."""
    from trainer.hosts.diffusers_host import DiffusersHost
    from trainer.training.loop import train

    host = DiffusersHost(tiny_models("sd15"))
    subject = scan_dataset(DatasetConfig(folder=str(write_shape_dataset(tmp_path / "subject", 2))))
    klass = scan_dataset(DatasetConfig(folder=str(write_shape_dataset(tmp_path / "class", 2, seed=5))))
    combined = combine([Part(subject), Part(klass, 0.0, REGULARIZATION)])
    latents = prepare_latents(combined, BUCKETS, host.encode_images, host.image_encoder_id, tmp_path / "cache")
    cfg = TrainConfig.from_dict({"steps": 8, "batch_size": 1, "network": {"rank": 4, "alpha": 4}})
    result = train(host, latents, cfg, tmp_path / "run", dataset_cfg=combined.config,
                   text_cache_dir=tmp_path / "text")
    zero = [loss == 0.0 for loss in result.losses]
    assert any(zero) and not all(zero), result.losses
    from trainer.data.batching import BatchSampler

    sampler = BatchSampler(latents.samples, 1, cfg.seed)
    drawn = [latents.samples[sampler.next_batch()[0]].loss_weight for _ in range(8)]
    assert zero == [w == 0.0 for w in drawn]


def test_a_combined_dataset_can_be_a_part(tmp_path):
    train, reg = make_parts(tmp_path)
    inner = combine([Part(train), Part(reg, 0.5, REGULARIZATION)])
    outer = combine([Part(inner, 2.0)])
    assert [i.loss_weight for i in outer.items] == [2.0, 2.0, 1.0, 1.0]
    assert [i.caption_options.caption_dropout for i in outer.items] == [1.0, 1.0, 0.0, 0.0]
