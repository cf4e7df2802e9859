"""Caption files, trigger insertion and the per-step caption variations."""
import random
from collections import Counter

from trainer.config import DatasetConfig
from trainer.data.captions import build_caption, contains_word, insert_trigger, read_caption_file, split_tags


def test_read_caption_strips_bom_and_normalises_whitespace(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbf  a photo,\n\n  of   a dog \r\n")
    assert read_caption_file(path) == ("a photo, of a dog", None)


def test_non_utf8_caption_is_read_as_cp1252_with_a_warning(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("caf\u00e9 \u2013 cr\u00e8me".encode("cp1252"))
    text, warning = read_caption_file(path)
    assert text == "caf\u00e9 \u2013 cr\u00e8me"
    assert "not valid UTF-8" in warning and "Windows-1252" in warning


def test_utf16_caption_is_decoded_with_a_warning(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffna\u00efve".encode("utf-16-le"))
    text, warning = read_caption_file(path)
    assert text == "na\u00efve" and "UTF-16" in warning


def test_whitespace_only_caption_reads_as_empty(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b" \t\r\n ")
    assert read_caption_file(path) == ("", None)


def test_trigger_inserted_only_when_missing_as_a_whole_word():
    assert insert_trigger("a dog", "ohwx") == "ohwx, a dog"
    assert insert_trigger("a photo of OHWX dog", "ohwx") == "a photo of OHWX dog"  # case-insensitive
    assert insert_trigger("ohwxy dog", "ohwx") == "ohwx, ohwxy dog"  # a longer word is not the trigger
    assert insert_trigger("", "ohwx") == "ohwx"
    assert insert_trigger("a dog", "") == "a dog"
    assert insert_trigger("a dog", "sks man", separator=" ") == "sks man a dog"
    assert contains_word("x, sks  man, y", "sks man") and not contains_word("sksman", "sks")


def test_no_shuffle_no_dropout_returns_the_normalised_caption():
    cfg = DatasetConfig()
    assert build_caption("  a,  b \n c ", cfg, random.Random(0)) == "a, b c"


def test_dropout_gives_empty_caption_at_the_configured_rate():
    cfg = DatasetConfig(caption_dropout=0.25)
    rng = random.Random(1)
    empty = sum(build_caption("a, b", cfg, rng) == "" for _ in range(4000))
    assert 850 < empty < 1150
    assert build_caption("a, b", DatasetConfig(caption_dropout=1.0), random.Random(0)) == ""


def test_shuffle_keeps_first_keep_tokens_and_permutes_the_rest():
    cfg = DatasetConfig(shuffle_captions=True, keep_tokens=2)
    raw = "first, second, c, d, e, f"
    rng = random.Random(3)
    seen = set()
    for _ in range(50):
        out = build_caption(raw, cfg, rng)
        tags = split_tags(out)
        assert tags[:2] == ["first", "second"]
        assert Counter(tags) == Counter(split_tags(raw))
        seen.add(out)
    assert len(seen) > 5


def test_trigger_tag_kept_first_wherever_the_user_wrote_it():
    cfg = DatasetConfig(shuffle_captions=True, keep_tokens=0, trigger_word="ohwx")
    rng = random.Random(0)
    for _ in range(20):
        assert build_caption("a, b, ohwx man, c, d", cfg, rng).startswith("ohwx man, ")
    cfg = DatasetConfig(shuffle_captions=True, keep_tokens=1, trigger_word="ohwx")
    assert build_caption("style, b, ohwx, c", cfg, random.Random(0)).startswith("ohwx, style, ")


def test_build_caption_is_deterministic_given_the_rng():
    cfg = DatasetConfig(shuffle_captions=True, caption_dropout=0.1, keep_tokens=1)
    raws = ["t, a, b, c, d", "t, x, y, z", "t, 1, 2, 3, 4, 5"] * 10
    first = [build_caption(r, cfg, rng) for rng in [random.Random(7)] for r in raws]
    second = [build_caption(r, cfg, rng) for rng in [random.Random(7)] for r in raws]
    assert first == second
    assert first != [build_caption(r, cfg, rng) for rng in [random.Random(8)] for r in raws]


def test_custom_separator_and_empty_tags():
    cfg = DatasetConfig(shuffle_captions=True, caption_separator="|", keep_tokens=1)
    out = build_caption("keep|| a |b|c", cfg, random.Random(0))
    assert out.startswith("keep| ") and sorted(split_tags(out, "|")) == ["a", "b", "c", "keep"]
