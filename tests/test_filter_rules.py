"""Each filter rule alone, on hand-made positive and negative cases (no tars, no processes)."""
from __future__ import annotations

import io

import pytest
from PIL import Image, ImageFile

from data_pipeline.filter import caption_rules as cr
from data_pipeline.filter import image_rules as ir
from data_pipeline.filter.config import CaptionRules, FilterConfig
from test_filter_support import encode, png_bomb, real_image


# ---- image decode -------------------------------------------------------------------------

def test_good_jpeg_and_png_decode_to_rgb():
    for fmt in ("JPEG", "PNG"):
        img, reason = ir.decode_image(encode(real_image(0), 64, fmt), max_pixels=10**8)
        assert reason is None and img.mode == "RGB" and img.size == (64, 64)


def test_rgba_png_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    img, reason = ir.decode_image(buf.getvalue(), 10**6)
    assert reason is None and img.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("data,reason", [
    (None, ir.MISSING_IMAGE),
    (b"", ir.EMPTY_IMAGE),
    (b"<html><body>404 not found</body></html>", ir.NOT_AN_IMAGE),
    (b"\xff\xd8\xff" + b"\x00" * 10, ir.NOT_AN_IMAGE),  # JPEG magic and nothing after it
])
def test_undecodable_inputs(data, reason):
    assert ir.decode_image(data, 10**8) == (None, reason)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_rejected_even_if_pil_was_told_to_allow_it(fmt):
    data = encode(real_image(1), 256, fmt)
    cut = data[: len(data) // 2]
    assert Image.open(io.BytesIO(cut)).size == (256, 256)  # the header alone still reads
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # as another library in the process might
    try:
        assert ir.decode_image(cut, 10**8) == (None, ir.CORRUPT_IMAGE)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def test_png_bomb_rejected_from_header_without_decoding(monkeypatch):
    calls = []
    orig = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: calls.append(1) or orig(self))
    # Huge declared size: PIL itself refuses (> 2 x MAX_IMAGE_PIXELS).
    assert ir.decode_image(png_bomb(100_000, 100_000), 89_478_485) == (None, ir.DECOMPRESSION_BOMB)
    # Under PIL's limit but over our cap: 81 Mpx would be allocated by a decode.
    bomb = png_bomb(9_000, 9_000)
    assert ir.check_header(bomb, 10**6) == (None, ir.DECOMPRESSION_BOMB)
    assert ir.decode_image(bomb, 10**6) == (None, ir.DECOMPRESSION_BOMB)
    assert calls == []  # no pixel data was decoded
    # The same file under a higher cap passes the header check (it is a valid PNG header).
    assert ir.check_header(bomb, 10**8) == ((9_000, 9_000), None)


# ---- size rules ---------------------------------------------------------------------------

def test_min_side_and_aspect():
    assert ir.min_side_ok(200, 300, 200) and not ir.min_side_ok(199, 300, 200)
    assert ir.aspect_ratio(600, 200) == 3.0 and ir.aspect_ratio(200, 600) == 3.0
    assert ir.aspect_ok(600, 200, 3.0) and not ir.aspect_ok(601, 200, 3.0)
    assert ir.size_reason(28, 28, 200, 3.0) == ir.MIN_SIDE
    assert ir.size_reason(1000, 250, 200, 3.0) == ir.ASPECT_RATIO
    assert ir.size_reason(250, 1000, 200, 3.0) == ir.ASPECT_RATIO
    assert ir.size_reason(256, 256, 200, 3.0) is None


# ---- caption clean-up ---------------------------------------------------------------------

def test_control_characters_and_whitespace_cleaned():
    text, reason = cr.clean_caption("a\x00 red\tdress\r\n on\u200b a \x1b[31mchair\x7f  ".encode())
    assert reason is None
    assert text == "a red dress on a chair"  # ftfy also drops the terminal escape
    assert all(ch.isprintable() for ch in text)


def test_html_entities_and_mojibake_repaired():
    assert cr.clean_caption("caf\u00c3\u00a9 &amp; cr\u00c3\u00a8me".encode())[0] == "café & crème"


def test_non_utf8_caption_dropped_or_stripped():
    raw = b"a red dress \xff\xfe on a chair"
    assert cr.clean_caption(raw, "drop") == (None, cr.CAPTION_ENCODING)
    assert cr.clean_caption(raw, "strip") == ("a red dress on a chair", None)
    # U+FFFD: an earlier lossy decode already lost bytes.
    assert cr.clean_caption("a red \ufffd dress", "drop") == (None, cr.CAPTION_ENCODING)


@pytest.mark.parametrize("raw", [None, b"", b"   \t\n ", b"\x00\x01\x02"])
def test_empty_caption(raw):
    assert cr.clean_caption(raw) == (None, cr.CAPTION_EMPTY)


# ---- caption rules ------------------------------------------------------------------------

RULES = CaptionRules()


@pytest.mark.parametrize("text,reason", [
    ("IMG_1234.JPG", cr.CAPTION_FILENAME),
    ("DSC0001.png", cr.CAPTION_FILENAME),
    ("image.jpeg", cr.CAPTION_FILENAME),
    ("/uploads/2021/05/summer-dress_v2.webp", cr.CAPTION_FILENAME),
    ("IMG_20210512_101010", cr.CAPTION_FILENAME),
    ("DSCN0042", cr.CAPTION_FILENAME),
    ("image", cr.CAPTION_GENERIC),
    ("Photo.", cr.CAPTION_GENERIC),
    ("untitled", cr.CAPTION_GENERIC),
    ("  No Image ", cr.CAPTION_GENERIC),
    ("https://example.com/products/123", cr.CAPTION_URL),
    ("buy now at www.example.com cheap", cr.CAPTION_URL),
    ("sale sale sale sale", cr.CAPTION_REPETITIVE),
    ("Best Best Best dress", cr.CAPTION_REPETITIVE),
    ("dress", cr.CAPTION_TOO_SHORT),
    ("sneakers", cr.CAPTION_TOO_FEW_WORDS),
    (" ".join(f"word{i}" for i in range(200)), cr.CAPTION_TOO_LONG),  # 1,489 characters
    (" ".join(f"w{i}" for i in range(201)), cr.CAPTION_TOO_MANY_WORDS),  # 201 words, 792 characters
])
def test_rejected_captions(text, reason):
    text = cr.normalize_whitespace(text)
    assert cr.caption_reason(text, RULES) == reason


@pytest.mark.parametrize("text", [
    "a photo of a t-shirt",
    "A red dress on a wooden chair",
    "New York, New York skyline at night",
    "the image of a cat sitting in a box",  # "image" inside a real caption is fine
    "sunset over the lake, photo by Ann",
    "Model 2021 jpg-style retro print shirt",
    " ".join(f"w{i}" for i in range(200)),  # 200 words, 788 characters: at the bounds
])
def test_accepted_captions(text):
    text = cr.normalize_whitespace(text)
    assert cr.caption_reason(text, RULES) is None, text


def test_length_bounds_are_inclusive_and_switchable():
    r = CaptionRules(min_chars=6, max_chars=10, min_words=2, max_words=3)
    assert cr.length_reason("ab cde", r) is None  # 6 chars, 2 words
    assert cr.length_reason("ab cd", r) == cr.CAPTION_TOO_SHORT
    assert cr.length_reason("ab cd efgh", r) is None  # 10 chars
    assert cr.length_reason("ab cd efghi", r) == cr.CAPTION_TOO_LONG
    assert cr.length_reason("a b c d", CaptionRules(min_chars=0, max_words=3)) == cr.CAPTION_TOO_MANY_WORDS
    off = CaptionRules(min_chars=0, max_chars=0, min_words=0, max_words=0)
    assert cr.length_reason("x", off) is None and cr.length_reason("y " * 5000, off) is None


def test_boilerplate_switch_and_custom_generic_words():
    assert cr.caption_reason("IMG_1234.JPG", CaptionRules(boilerplate=False, min_words=1)) is None
    assert cr.caption_reason("product shot", CaptionRules(generic_words=["product shot"])) == cr.CAPTION_GENERIC


def test_config_from_dict_rejects_unknown_and_contradictory_settings():
    cfg = FilterConfig.from_dict({"image": {"min_side": 64}, "dedup": {"phash_distance": 2}})
    assert cfg.image.min_side == 64 and cfg.dedup.phash_distance == 2 and cfg.caption.min_words == 2
    with pytest.raises(ValueError, match="unknown key"):
        FilterConfig.from_dict({"image": {"min_sid": 64}})
    with pytest.raises(ValueError, match="did you mean .image."):
        FilterConfig.from_dict({"imag": {}})
    with pytest.raises(ValueError, match="checkpoint"):
        FilterConfig.from_dict({"clip_score": {"enabled": True}})
    with pytest.raises(ValueError, match="bad_encoding"):
        FilterConfig.from_dict({"caption": {"bad_encoding": "ignore"}})
