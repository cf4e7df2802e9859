"""Dataset scanning: the messy folder is reported file by file; hopeless folders give one clear error."""
import hashlib
import json
import os
import time

import pytest
from PIL import Image

from tests.messy import build_messy_folder, encoded, photo_like
from trainer.config import DatasetConfig
from trainer.data.dataset import DatasetError, fingerprint, scan_dataset
from trainer.errors import TrainingError


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    return build_messy_folder(tmp_path_factory.mktemp("messy") / "data")


@pytest.fixture(scope="module")
def scanned(messy):
    return scan_dataset(DatasetConfig(folder=str(messy.root), trigger_word="ohwx"), min_size=256)


def test_usable_images_are_kept_and_bad_ones_skipped(messy, scanned):
    assert {i.rel_path for i in scanned.items} == messy.usable
    assert {f for f, _ in scanned.report.unreadable} == messy.unreadable
    reasons = dict(scanned.report.unreadable)
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert "truncated" in reasons["truncated.png"] and "truncated" in reasons["truncated.jpg"]
    assert "not a readable image" in reasons["corrupt.jpg"]


def test_report_names_every_problem_and_file(messy, scanned):
    report = scanned.report
    assert set(report.missing_captions) == messy.missing_captions
    assert report.captions_without_image == ["orphan.txt"]
    warnings = dict(report.caption_warnings)
    assert "Windows-1252" in warnings["latin.txt"] and "whitespace" in warnings["blank.txt"]
    assert report.duplicates == [["dup_of_good.png", "good.png"]]
    small = {f for f, _, _ in report.too_small}
    assert {"tiny.png", "cmyk.jpg", "rotated.jpg", "grey16.png"} == small  # under 256*256 px
    assert [f for f, _ in report.skipped] == ["notes.md"]  # hidden files are not even listed
    text = report.to_text()
    for name in (messy.unreadable | messy.missing_captions | messy.orphan_captions
                 | {"latin.txt", "blank.txt", "dup_of_good.png", "tiny.png", "notes.md"}):
        assert name in text, name
    assert "truncated" in text and "0 bytes" in text
    json.dumps(report.to_dict())  # the nodes show/serialise it


def test_counts_and_repeats_from_nested_kohya_folders(messy, scanned):
    items = {i.rel_path: i for i in scanned.items}
    assert {k: v.repeats for k, v in items.items()} == messy.repeats
    assert items["10_ohwx/nested/deep.png"].repeats == 10  # inherits the nearest N_ prefix
    assert items["10_ohwx/5_more/five.bmp"].repeats == 5
    assert items["abc_plain/plain.webp"].repeats == 1  # non-numeric prefix: a plain folder
    report = scanned.report
    assert report.images == len(messy.usable)
    assert report.captioned == len(messy.usable) - len(messy.missing_captions)
    assert report.samples_per_epoch == sum(messy.repeats.values())
    assert report.folders["10_ohwx"] == (10, 2) and report.folders["10_ohwx/5_more"] == (5, 1)
    assert sum(report.short_side_histogram.values()) == report.images


def test_captions_are_decoded_cleaned_and_get_the_trigger(scanned):
    captions = {i.rel_path: i.caption for i in scanned.items}
    assert captions["good.png"] == "ohwx, a red bus, city street"
    assert captions["10_ohwx/photo.jpg"] == "ohwx on a beach"  # already there: not inserted twice
    assert captions["latin.png"] == "ohwx, caf\u00e9 au lait"
    assert captions["bom.png"] == "ohwx, caption with a BOM"
    assert captions["blank.png"] == "ohwx" and captions["no_caption.png"] == "ohwx"
    captioned = {i.rel_path: i.captioned for i in scanned.items}
    assert not captioned["blank.png"] and captioned["good.png"]


def test_sizes_orientation_and_content_hash(messy, scanned):
    items = {i.rel_path: i for i in scanned.items}
    assert (items["rotated.jpg"].width, items["rotated.jpg"].height) == (200, 300)  # EXIF orientation 6
    assert (items["huge.jpg"].width, items["huge.jpg"].height) == (6000, 4000)
    data = (messy.root / "good.png").read_bytes()
    assert items["good.png"].content_hash == hashlib.sha256(data).hexdigest()
    assert os.path.isabs(items["good.png"].path)


def test_missing_caption_uses_the_kohya_folder_words(tmp_path):
    folder = tmp_path / "set" / "3_sks dog"
    folder.mkdir(parents=True)
    photo_like(64, 64).save(folder / "a.png")
    ds = scan_dataset(DatasetConfig(folder=str(tmp_path / "set")))
    assert ds.items[0].caption == "sks dog" and ds.items[0].repeats == 3
    ds = scan_dataset(DatasetConfig(folder=str(tmp_path / "set"), trigger_word="ohwx"))
    assert ds.items[0].caption == "ohwx, sks dog"


def test_default_repeats_and_zero_repeat_folders(tmp_path):
    photo_like(64, 64).save(tmp_path / "a.png")
    (tmp_path / "0_off").mkdir()
    photo_like(64, 64).save(tmp_path / "0_off" / "b.png")
    ds = scan_dataset(DatasetConfig(folder=str(tmp_path), default_repeats=4))
    assert [(i.rel_path, i.repeats) for i in ds.items] == [("a.png", 4)]
    assert ds.report.skipped == [("0_off/b.png", "folder '0_off' asks for 0 repeats")]


def test_custom_caption_extension(tmp_path):
    photo_like(64, 64).save(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("from caption file")
    (tmp_path / "a.txt").write_text("not this one")
    ds = scan_dataset(DatasetConfig(folder=str(tmp_path), caption_extension="caption"))
    assert ds.items[0].caption == "from caption file"
    assert ds.report.skipped == [("a.txt", ds.report.skipped[0][1])]


@pytest.mark.parametrize("make", ["missing", "empty", "file", "only_bad", "blank_setting"])
def test_unusable_folder_gives_one_clear_error(tmp_path, make):
    folder = tmp_path / "data"
    if make == "empty":
        folder.mkdir()
    elif make == "file":
        folder.write_text("x")
    elif make == "only_bad":
        folder.mkdir()
        (folder / "broken.jpg").write_bytes(b"")
        (folder / "broken.txt").write_text("caption")
        (folder / "clip.mp4").write_bytes(b"\0")
    with pytest.raises(DatasetError) as info:
        scan_dataset(DatasetConfig(folder="" if make == "blank_setting" else str(folder)))
    message = str(info.value)
    assert isinstance(info.value, TrainingError)
    if make == "blank_setting":
        assert "No dataset folder given" in message
        return
    assert str(folder) in message
    if make == "missing":
        assert "not found" in message
    if make == "empty":
        assert "found 0 image file(s)" in message
    if make == "only_bad":
        assert "broken.jpg: empty file (0 bytes)" in message and "1 caption file(s)" in message
        assert info.value.report.unreadable == [("broken.jpg", "empty file (0 bytes)")]


def test_fingerprint_changes_with_any_image_or_caption(tmp_path):
    photo_like(64, 64, 1).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("one")
    photo_like(64, 64, 2).save(tmp_path / "b.jpg")
    base = fingerprint(tmp_path)
    assert fingerprint(tmp_path) == base
    assert scan_dataset(DatasetConfig(folder=str(tmp_path))).fingerprint == base
    (tmp_path / "notes.md").write_text("irrelevant")
    assert fingerprint(tmp_path) == base == scan_dataset(DatasetConfig(folder=str(tmp_path))).fingerprint
    seen = {base}

    def changed():
        value = fingerprint(tmp_path)
        assert value not in seen
        seen.add(value)

    later = time.time() + 5
    (tmp_path / "a.txt").write_text("two")  # same size, new content
    os.utime(tmp_path / "a.txt", (later, later))
    changed()
    (tmp_path / "b.jpg").write_bytes(encoded(photo_like(64, 64, 3), "JPEG"))
    changed()
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "c.png")
    changed()
    (tmp_path / "sub" / "c.png").rename(tmp_path / "sub" / "d.png")
    changed()
    assert fingerprint(tmp_path / "nope").startswith("missing:")
