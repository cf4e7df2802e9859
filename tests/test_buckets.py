"""Bucketing: kohya's bucket sets, assignment, no-upscale, and crop offsets that are the ones really cut."""
import random

import numpy as np
import pytest
from PIL import Image

from trainer.config import BucketConfig
from trainer.data.buckets import (
    Bucketer,
    ImageTooSmall,
    apply_crop_plan,
    bucket_report,
    cover_size,
    make_buckets,
    no_upscale_size,
    plan_crop,
    select_bucket,
)
from trainer.errors import ConfigError

SD15 = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
        (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)]
SDXL_PORTRAIT = [(256, 2048), (320, 2048), (384, 2048), (448, 2048), (512, 1856), (512, 1920), (512, 1984),
                 (512, 2048), (576, 1664), (576, 1728), (576, 1792), (640, 1536), (640, 1600), (704, 1408),
                 (704, 1472), (768, 1280), (768, 1344), (832, 1216), (896, 1152), (960, 1088)]


def test_sd15_bucket_list_equals_kohya():
    assert make_buckets(512, 256, 1024, 64) == SD15


def test_sdxl_with_max_2048_has_kohyas_41_buckets():
    buckets = make_buckets(1024, 256, 2048, 64)
    expected = sorted(set(SDXL_PORTRAIT) | {(h, w) for w, h in SDXL_PORTRAIT} | {(1024, 1024)})
    assert len(buckets) == 41 and buckets == expected
    assert (832, 1216) in buckets and (1216, 832) in buckets


def test_sdxl_with_default_max_has_25_buckets_and_no_832x1216():
    buckets = make_buckets(1024, 256, 1024, 64)
    assert len(buckets) == 25 and (832, 1216) not in buckets


@pytest.mark.parametrize("res, lo, hi, step", [(512, 256, 1024, 64), (768, 256, 1536, 32), (1024, 512, 2048, 64)])
def test_every_bucket_fits_the_rules(res, lo, hi, step):
    for w, h in make_buckets(res, lo, hi, step):
        assert w % step == 0 and h % step == 0
        assert lo <= w <= hi and lo <= h <= hi
        assert w * h <= res * res


def test_min_and_max_are_snapped_to_the_step_like_kohya():
    assert make_buckets(512, 250, 1000, 64) == make_buckets(512, 192, 1024, 64)


def test_bad_limits_name_the_setting():
    with pytest.raises(ConfigError, match="max_bucket"):
        make_buckets(1024, 256, 768, 64)
    with pytest.raises(ConfigError, match="min_bucket"):
        make_buckets(512, 640, 1024, 64)
    with pytest.raises(ConfigError, match="step"):
        make_buckets(512, 256, 1024, 12)
    with pytest.raises(ConfigError, match="resolutions"):
        Bucketer(BucketConfig(resolutions=[]))
    with pytest.raises(ConfigError, match="crop"):
        Bucketer(BucketConfig(crop="left"))


def test_exact_size_match_wins_then_nearest_aspect_ratio():
    assert select_bucket((448, 576), SD15) == ((448, 576), 0.0)
    bucket, err = select_bucket((1000, 1000), SD15)
    assert bucket == (512, 512) and err == 0.0
    bucket, err = select_bucket((1600, 900), SD15)  # 1.78 -> 640x384 (1.67) beats 704x320 (2.2)
    assert bucket == (640, 384) and err == pytest.approx(640 / 384 - 1600 / 900)


def test_cover_size_covers_the_bucket_with_one_side_exact():
    for size in [(1600, 900), (900, 1600), (333, 777), (16, 16), (6000, 4000), (4000, 200)]:
        bucket, _ = select_bucket(size, SD15)
        rw, rh = cover_size(size, bucket)
        assert rw >= bucket[0] and rh >= bucket[1]
        assert rw == bucket[0] or rh == bucket[1]
        assert abs(rw / rh - size[0] / size[1]) < 0.02 * size[0] / size[1] + 0.01


def test_no_upscale_never_enlarges():
    rng = random.Random(0)
    for _ in range(500):
        size = (rng.randint(64, 5000), rng.randint(64, 5000))
        if max(size) / min(size) > 30:
            continue
        resized, bucket = no_upscale_size(size, 512, 64)
        assert resized[0] <= size[0] and resized[1] <= size[1], size
        assert bucket[0] <= resized[0] and bucket[1] <= resized[1]
        assert bucket[0] % 64 == 0 and bucket[1] % 64 == 0
        assert bucket[0] * bucket[1] <= 512 * 512
    assert no_upscale_size((300, 200), 512, 64) == ((300, 200), (256, 192))  # small: no resize, only a trim


def test_no_upscale_plans_keep_small_images_unscaled_and_reject_tiny_ones():
    bucketer = Bucketer(BucketConfig(resolutions=[512], no_upscale=True))
    (plan,) = bucketer.plans((300, 200))
    assert plan.resized_size == (300, 200) and plan.bucket == (256, 192)
    assert (plan.crop_left, plan.crop_top) == (22, 4)
    with pytest.raises(ImageTooSmall):
        bucketer.plans((16, 16))


def _coordinate_image(w, h):
    """R, G = x, y (mod 256), B = x // 256 + 16 * (y // 256): every pixel says where it is."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x % 256, y % 256, x // 256 + 16 * (y // 256)], axis=-1).astype(np.uint8)


def _position(pixel):
    r, g, b = (int(v) for v in pixel)
    return r + 256 * (b % 16), g + 256 * (b // 16)


@pytest.mark.parametrize("crop", ["center", "random"])
def test_recorded_offsets_are_the_pixels_actually_cut(crop):
    bucketer = Bucketer(BucketConfig(resolutions=[512], crop=crop), seed=5)
    for i, size in enumerate([(1600, 900), (700, 1300), (512, 512), (2000, 300)]):
        (plan,) = bucketer.plans(size, key=f"image{i}")
        resized = _coordinate_image(*plan.resized_size)  # already at the planned size: only the cut remains
        out = np.asarray(apply_crop_plan(Image.fromarray(resized), plan))
        assert out.shape == (plan.bucket[1], plan.bucket[0], 3)
        assert _position(out[0, 0]) == (plan.crop_left, plan.crop_top)
        assert _position(out[-1, -1]) == (plan.crop_left + plan.bucket[0] - 1, plan.crop_top + plan.bucket[1] - 1)
        assert plan.crop_top_left == (plan.crop_top, plan.crop_left)
        # the flipped variant's offset is where the same cut sits in the mirrored resized image
        top, left = plan.flipped_crop_top_left
        mirrored = resized[:, ::-1]
        assert (mirrored[top:top + plan.bucket[1], left:left + plan.bucket[0]] == out[:, ::-1]).all()


def test_offsets_survive_the_resize():
    """A dark column at x=1000 of a 1600x900 image lands where scale * 1000 - crop_left says."""
    img = np.full((900, 1600, 3), 255, np.uint8)
    img[:, 998:1002] = 0
    plan = plan_crop((1600, 900), 512, make_buckets(512), crop="random", rng=random.Random(3))
    out = np.asarray(apply_crop_plan(Image.fromarray(img), plan)).astype(int).sum(axis=(0, 2))
    scale = plan.resized_size[0] / 1600
    assert abs(int(out.argmin()) - (1000 * scale - plan.crop_left)) <= 1.5


def test_random_crop_is_seeded_per_image_and_centre_crop_is_centred():
    cfg = BucketConfig(resolutions=[512], crop="random")
    a = [Bucketer(cfg, seed=1).plans((1600, 900), key=f"k{i}")[0].crop_left for i in range(20)]
    assert a == [Bucketer(cfg, seed=1).plans((1600, 900), key=f"k{i}")[0].crop_left for i in range(20)]
    assert len(set(a)) > 5
    assert a != [Bucketer(cfg, seed=2).plans((1600, 900), key=f"k{i}")[0].crop_left for i in range(20)]
    (plan,) = Bucketer(BucketConfig(resolutions=[512])).plans((1600, 900))
    assert plan.crop_left == (plan.resized_size[0] - plan.bucket[0]) // 2 and plan.crop_top == 0


def test_several_base_resolutions_give_one_plan_each():
    plans = Bucketer(BucketConfig(resolutions=[768, 512], max_bucket=1536)).plans((1200, 800))
    assert [p.resolution for p in plans] == [512, 768]
    for p in plans:
        assert p.bucket[0] * p.bucket[1] <= p.resolution ** 2
        assert p.original_size == (800, 1200)
    assert plans[0].bucket != plans[1].bucket


@pytest.mark.parametrize("size", [(16, 16), (6000, 4000), (5000, 300), (300, 5000), (513, 511), (64, 64)])
def test_apply_crop_plan_always_returns_the_bucket_size(size):
    img = Image.new("RGB", size, (10, 20, 30))
    for plan in Bucketer(BucketConfig(resolutions=[512, 256], min_bucket=128)).plans(size):
        assert apply_crop_plan(img, plan).size == plan.bucket
    half = img.resize((max(1, size[0] // 2), max(1, size[1] // 2)))  # e.g. a JPEG decoded at 1/2 scale
    for plan in Bucketer(BucketConfig()).plans(size):
        assert apply_crop_plan(half, plan).size == plan.bucket


def test_bucket_report_counts_images_samples_and_aspect_error():
    bucketer = Bucketer(BucketConfig())
    plans = [bucketer.plans(s)[0] for s in [(512, 512), (1000, 1000), (1600, 900)]]
    report = bucket_report(plans, repeats=[1, 10, 2])
    rows = {b: (n, s) for _, b, n, s in report.rows}
    assert rows[(512, 512)] == (2, 11) and rows[(640, 384)] == (1, 2)
    assert report.mean_ar_error == pytest.approx(abs(640 / 384 - 16 / 9) / 3)
    assert "640x384" in report.to_text() and report.to_dict()["buckets"][0]["resolution"] == 512
