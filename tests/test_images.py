"""Image loading: every mode becomes correct RGB, orientation is applied, bad files give ImageReadError reasons."""
import numpy as np
import pytest
from PIL import Image

from tests.messy import encoded, photo_like
from trainer.data.images import ImageReadError, check_image, is_image_file, load_image, read_size, to_rgb
from trainer.errors import TrainingError


def test_rgba_and_la_are_composited_on_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 255, 128)])
    out = np.asarray(to_rgb(rgba))
    assert out.dtype == np.uint8 and out.shape == (1, 3, 3)
    assert tuple(out[0, 0]) == (255, 255, 255)  # fully transparent -> white, not the hidden red
    assert tuple(out[0, 1]) == (255, 0, 0)
    assert tuple(out[0, 2]) == pytest.approx((127, 127, 255), abs=2)  # half blue over white
    la = Image.new("LA", (1, 1), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.putdata([0, 1])
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    out = load_image(path)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)  # index 0 is transparent (and black underneath)
    assert out.getpixel((1, 0)) == (0, 255, 0)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]  # Pillow's own convert would give [0, 255, 255, 255]
    assert (out[..., 0] == out[..., 2]).all()
    assert np.asarray(to_rgb(Image.fromarray(ramp.astype(np.int32), mode="I")))[0, :, 1].tolist() == [0, 1, 128, 255]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path)  # no cyan, full magenta + yellow = red
    out = load_image(path)
    assert out.mode == "RGB"
    r, g, b = out.getpixel((8, 8))
    assert r > 240 and g < 20 and b < 20


def test_exif_orientation_applied_to_size_and_pixels(tmp_path):
    stored = Image.new("RGB", (40, 20), (255, 255, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    stored.save(path, exif=exif, quality=95)
    assert read_size(path) == (20, 40)
    assert check_image(path.read_bytes(), path) == (20, 40)
    out = load_image(path)
    assert out.size == (20, 40)
    assert out.getpixel((16, 3))[1] < 60  # the red block is now at the top-right
    assert out.getpixel((3, 3)) == pytest.approx((255, 255, 255), abs=30)


def test_jpeg_draft_decodes_smaller_but_never_below_target(tmp_path):
    path = tmp_path / "big.jpg"
    photo_like(2000, 1200, 1).save(path, quality=90)
    out = load_image(path, target_size=(480, 288))
    assert out.size == (500, 300)  # libjpeg's 1/4 scale: the largest reduction still >= the target
    full = load_image(path)
    assert full.size == (2000, 1200)
    small = np.asarray(full.resize((500, 300), Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(np.asarray(out, dtype=np.float32) - small).mean() < 4  # same picture, not a crop
    exif = Image.Exif()
    exif[0x0112] = 8
    photo_like(2000, 1200, 2).save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg", target_size=(288, 480)).size == (300, 500)  # request rotated too


def test_webp_bmp_and_grey_load_as_rgb(tmp_path):
    for fmt, ext in (("WEBP", "webp"), ("BMP", "bmp")):
        path = tmp_path / f"x.{ext}"
        photo_like(64, 48, 3).save(path, fmt)
        assert is_image_file(path)
        img = load_image(path)
        assert img.mode == "RGB" and img.size == (64, 48)
    assert to_rgb(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert not is_image_file("notes.txt") and is_image_file("A.JPEG")


@pytest.mark.parametrize(
    "name, make, words",
    [
        ("empty.jpg", lambda: b"", "empty"),
        ("junk.jpg", lambda: b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "not a readable image"),
        ("text.png", lambda: b"hello, I am not a picture", "not a readable image"),
        ("half.png", lambda: encoded(photo_like(200, 200, 4), "PNG")[:3000], "truncated"),
        ("half.jpg", lambda: encoded(photo_like(200, 200, 5), "JPEG")[:2000], "truncated"),
    ],
)
def test_bad_files_raise_image_read_error_with_reason(tmp_path, name, make, words):
    path = tmp_path / name
    path.write_bytes(make())
    for attempt in (lambda: check_image(path.read_bytes(), path), lambda: load_image(path)):
        with pytest.raises(ImageReadError) as info:
            attempt()
        assert words in info.value.reason
        assert info.value.path == str(path) and name in str(info.value)
        assert isinstance(info.value, TrainingError)


def test_check_image_accepts_jpeg_with_bytes_after_the_end_marker(tmp_path):
    data = encoded(photo_like(64, 64, 6), "JPEG") + b"camera trailer data"
    assert check_image(data, tmp_path / "x.jpg") == (64, 64)


def test_png_exif_orientation_is_seen_by_scan_and_load_alike(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.png"
    photo_like(40, 20, 7).save(path, exif=exif)
    assert read_size(path) == check_image(path.read_bytes(), path) == load_image(path).size == (20, 40)
