"""Caption clean-up and caption rules of the filter stage, each a small pure function.

    from data_pipeline.filter.caption_rules import clean_caption, caption_reason
    text, reason = clean_caption(raw_bytes, bad_encoding="drop")   # (str, None) or (None, reason)
    reason = caption_reason(text, CaptionRules())                    # None when the caption passes
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter

import ftfy

from data_pipeline.filter.config import CaptionRules

CAPTION_ENCODING = "filter/caption_encoding"
CAPTION_EMPTY = "filter/caption_empty"
CAPTION_TOO_SHORT = "filter/caption_too_short"
CAPTION_TOO_LONG = "filter/caption_too_long"
CAPTION_TOO_FEW_WORDS = "filter/caption_too_few_words"
CAPTION_TOO_MANY_WORDS = "filter/caption_too_many_words"
CAPTION_FILENAME = "filter/caption_filename"
CAPTION_GENERIC = "filter/caption_generic"
CAPTION_URL = "filter/caption_url"
CAPTION_REPETITIVE = "filter/caption_repetitive"

_REPLACEMENT = "\ufffd"
_ZERO_WIDTH_KEEP = {"\u200d"}  # ZWJ builds emoji sequences: keep it
_WS = re.compile(r"\s+")
# A whole caption that is a file name: optional path, a stem without spaces, an image
# or document extension ("IMG_1234.JPG", "DSC0001.png", "image.jpeg", "/a/b/photo-1.webp").
_FILENAME = re.compile(
    r"^(?:[\w./\\-]*[/\\])?[\w\-. ()\[\]~+]*?\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic|avif|svg|ico|pdf)$",
    re.IGNORECASE,
)
# Camera/phone default names even without an extension: IMG_1234, DSC01234, DSCN0001, PXL_2021...
_CAMERA_NAME = re.compile(
    r"^(?:img|dsc[nf]?|dcim|pxl|mvimg|photo|image|pic|screenshot|scan|p)[_\- ]?\d[\d_\- ]*$",
    re.IGNORECASE,
)
_URL = re.compile(r"(?:[a-z][a-z0-9+.\-]*://|www\.)\S+", re.IGNORECASE)
_WORD = re.compile(r"\w+", re.UNICODE)


def decode_caption(raw: bytes | str | None, bad_encoding: str = "drop") -> tuple[str | None, str | None]:
    """bytes -> str. Non-UTF-8 bytes (or U+FFFD left by an earlier lossy decode) are
    rejected ("drop") or removed ("strip")."""
    if raw is None:
        return "", None
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            if bad_encoding == "drop":
                return None, CAPTION_ENCODING
            text = raw.decode("utf-8", errors="ignore")
    else:
        text = raw
    if _REPLACEMENT in text:
        if bad_encoding == "drop":
            return None, CAPTION_ENCODING
        text = text.replace(_REPLACEMENT, "")
    return text, None


def strip_controls(text: str) -> str:
    """Control and format characters -> space (tab, newline and friends included), except ZWJ."""
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat == "Cc" or (cat in ("Cf", "Zl", "Zp") and ch not in _ZERO_WIDTH_KEEP):
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def normalize_whitespace(text: str) -> str:
    return _WS.sub(" ", text).strip()


def clean_caption(raw: bytes | str | None, bad_encoding: str = "drop", fix_text: bool = True) -> tuple[str | None, str | None]:
    """Decode, repair (ftfy), drop control characters, collapse whitespace.

    Returns (clean text, None) or (None, reason); an empty result is CAPTION_EMPTY.
    """
    text, reason = decode_caption(raw, bad_encoding)
    if reason is not None:
        return None, reason
    assert text is not None
    if fix_text:
        # ftfy also turns HTML entities into characters and normalises to NFC.
        text = ftfy.fix_text(text)
    text = normalize_whitespace(strip_controls(text))
    if not text:
        return None, CAPTION_EMPTY
    return text, None


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def is_filename(text: str) -> bool:
    t = text.strip().strip("\"'")
    return bool(_FILENAME.match(t) or _CAMERA_NAME.match(t))


def is_generic(text: str, generic_words: list[str]) -> bool:
    """The whole caption is one generic word/phrase ("image", "Photo.", "untitled")."""
    norm = " ".join(w.lower() for w in words(text))
    return norm in {g.lower() for g in generic_words}


def has_url(text: str) -> bool:
    return bool(_URL.search(text))


def is_repetitive(text: str, min_words: int = 3, fraction: float = 0.6) -> bool:
    """Most frequent word makes up >= fraction of >= min_words words ("sale sale sale sale")."""
    ws = [w.lower() for w in words(text)]
    if len(ws) < max(2, min_words):
        return False
    top = Counter(ws).most_common(1)[0][1]
    return top / len(ws) >= fraction


def boilerplate_reason(text: str, rules: CaptionRules) -> str | None:
    if is_filename(text):
        return CAPTION_FILENAME
    if is_generic(text, rules.generic_words):
        return CAPTION_GENERIC
    if has_url(text):
        return CAPTION_URL
    if is_repetitive(text, rules.repeat_min_words, rules.repeat_fraction):
        return CAPTION_REPETITIVE
    return None


def length_reason(text: str, rules: CaptionRules) -> str | None:
    n_chars, n_words = len(text), len(words(text))
    if rules.min_chars > 0 and n_chars < rules.min_chars:
        return CAPTION_TOO_SHORT
    if rules.max_chars > 0 and n_chars > rules.max_chars:
        return CAPTION_TOO_LONG
    if rules.min_words > 0 and n_words < rules.min_words:
        return CAPTION_TOO_FEW_WORDS
    if rules.max_words > 0 and n_words > rules.max_words:
        return CAPTION_TOO_MANY_WORDS
    return None


def caption_reason(text: str, rules: CaptionRules) -> str | None:
    """Boilerplate first (a file name is boilerplate whatever its length), then length."""
    if rules.boilerplate:
        reason = boilerplate_reason(text, rules)
        if reason is not None:
            return reason
    return length_reason(text, rules)
