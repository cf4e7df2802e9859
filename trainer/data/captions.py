"""Caption text: reading sidecar files, inserting the trigger word, and the per-step variations.

Reading happens once, at scan time (:func:`read_caption_file`, :func:`insert_trigger`). The variations
(dropout, tag shuffling) happen every time a sample is drawn (:func:`build_caption`), driven by a caller-owned
``random.Random`` so a resumed run draws the same captions.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Optional

from ..config import DatasetConfig

UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def normalise_whitespace(text: str) -> str:
    """Collapse every run of whitespace (newlines included) into one space and trim the ends."""
    return " ".join(text.split())


def read_caption_file(path: str | Path) -> tuple[str, Optional[str]]:
    """Return (caption, warning). The caption is whitespace-normalised; "" means empty.

    UTF-8 (with or without BOM) is the expected encoding. Anything else is still read rather than dropped, because
    an image trained without its caption is a silent quality loss while a mis-decoded accent is visible in the
    report: UTF-16 with a BOM (Windows Notepad "Unicode") is decoded as such; other bytes are decoded as
    Windows-1252 (a superset of Latin-1 for text; the usual "ANSI" encoding). Both come with a warning.
    """
    data = Path(path).read_bytes()
    warning = None
    if data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM):]
    if data[:2] in UTF16_BOMS:
        text = data.decode("utf-16", errors="replace")
        warning = "saved as UTF-16; read as UTF-16 (re-save as UTF-8 to silence this)"
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            try:
                text = data.decode("cp1252")
            except UnicodeDecodeError:  # the 5 bytes cp1252 leaves undefined
                text = data.decode("latin-1")
            warning = (
                f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); read as Windows-1252 - "
                "check the text and re-save the file as UTF-8"
            )
    return normalise_whitespace(text), warning


def contains_word(text: str, phrase: str) -> bool:
    """Case-insensitive whole-word search: "ohwx" is in "a photo of OHWX" but not in "ohwxy"."""
    words = phrase.split()
    if not words:
        return False
    pattern = r"\s+".join(re.escape(w) for w in words)  # "sks man" also matches "sks  man"
    return re.search(rf"(?<!\w){pattern}(?!\w)", text, flags=re.IGNORECASE) is not None


def tag_joiner(separator: str) -> str:
    """How tags are joined back: "," -> ", "; a whitespace separator stays a single space."""
    stripped = separator.strip()
    return f"{stripped} " if stripped else " "


def insert_trigger(caption: str, trigger: str, separator: str = ",") -> str:
    """Put the trigger word in front of a caption that does not already contain it."""
    trigger = normalise_whitespace(trigger)
    if not trigger or contains_word(caption, trigger):
        return caption
    return f"{trigger}{tag_joiner(separator)}{caption}" if caption else trigger


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """Tags of a caption, trimmed, empty ones dropped ("a,, b" -> ["a", "b"])."""
    parts = caption.split(separator) if separator.strip() else caption.split()
    return [t for t in (normalise_whitespace(p) for p in parts) if t]


def build_caption(raw: str, cfg: DatasetConfig, rng: random.Random) -> str:
    """The caption a sample trains with this time: dropout, then tag shuffling with fixed leading tags.

    The trigger word's tag is always kept first when present (it was inserted at the front at scan time, but a
    user-written caption may carry it elsewhere). Deterministic for a given `rng` state; draws one number for
    dropout even when dropout is off, so turning it on does not reshuffle every other caption.
    """
    dropped = rng.random() < cfg.caption_dropout
    if dropped:
        return ""
    text = normalise_whitespace(raw)
    if not cfg.shuffle_captions:
        return text
    tags = split_tags(text, cfg.caption_separator)
    keep = max(0, int(cfg.keep_tokens))
    fixed, rest = tags[:keep], tags[keep:]
    trigger = normalise_whitespace(cfg.trigger_word)
    if trigger and not any(contains_word(t, trigger) for t in fixed):
        for i, tag in enumerate(rest):
            if contains_word(tag, trigger):
                fixed.insert(0, rest.pop(i))
                break
    rng.shuffle(rest)
    return tag_joiner(cfg.caption_separator).join(fixed + rest)
