"""Image rules of the filter stage, each a small pure function.

    from data_pipeline.filter.image_rules import decode_image, size_reason
    img, reason = decode_image(data, max_pixels=89_478_485)   # (PIL RGB image, None) or (None, "filter/...")
    reason = size_reason(w, h, min_side=200, max_aspect_ratio=3.0)
"""
from __future__ import annotations

import io
import warnings

from PIL import Image, ImageFile

from pretrain.shards.images import DecompressionBombError, NotAnImageError, checked_size

# Reasons, in the order the rules run.
MISSING_IMAGE = "filter/missing_image"
EMPTY_IMAGE = "filter/empty_image"
NOT_AN_IMAGE = "filter/not_an_image"
DECOMPRESSION_BOMB = "filter/decompression_bomb"
CORRUPT_IMAGE = "filter/corrupt_image"  # truncated or otherwise undecodable pixel data
MIN_SIDE = "filter/min_side"
ASPECT_RATIO = "filter/aspect_ratio"


def check_header(data: bytes, max_pixels: int) -> tuple[tuple[int, int] | None, str | None]:
    """Read only the header: ((w, h), None) or (None, reason). No pixel data is decoded.
    The cap is the shards' one pixel rule (pretrain.shards.images), which the trainer's
    decoder and evaluation apply too."""
    if not data:
        return None, EMPTY_IMAGE
    try:
        return checked_size(data, max_pixels), None
    except DecompressionBombError:
        return None, DECOMPRESSION_BOMB
    except NotAnImageError:
        return None, NOT_AN_IMAGE


def decode_image(data: bytes | None, max_pixels: int) -> tuple[Image.Image | None, str | None]:
    """Fully decode ``data`` into an RGB image, or return the rejection reason.

    The pixel cap is checked from the header first, so a bomb never allocates its pixels.
    Truncated data is an error: LOAD_TRUNCATED_IMAGES is forced off for the decode (another
    library in the process may have switched it on) and restored after.
    """
    if data is None:
        return None, MISSING_IMAGE
    _, reason = check_header(data, max_pixels)
    if reason is not None:
        return None, reason
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()  # the full decode: truncated or corrupt pixel data raises here
            if img.mode != "RGB":
                # Palette/alpha/grey -> RGB; transparent pixels go to white (what a
                # browser shows on a white page) rather than to black.
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    rgba = img.convert("RGBA")
                    bg = Image.new("RGB", rgba.size, (255, 255, 255))
                    bg.paste(rgba, mask=rgba.getchannel("A"))
                    img = bg
                else:
                    img = img.convert("RGB")
    except Exception:
        return None, CORRUPT_IMAGE
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    return img, None


def min_side_ok(width: int, height: int, min_side: int) -> bool:
    return min(width, height) >= min_side


def aspect_ratio(width: int, height: int) -> float:
    return max(width, height) / max(1, min(width, height))


def aspect_ok(width: int, height: int, max_aspect_ratio: float) -> bool:
    return aspect_ratio(width, height) <= max_aspect_ratio


def size_reason(width: int, height: int, min_side: int, max_aspect_ratio: float) -> str | None:
    """The first failing size rule's reason, or None."""
    if not min_side_ok(width, height, min_side):
        return MIN_SIDE
    if not aspect_ok(width, height, max_aspect_ratio):
        return ASPECT_RATIO
    return None
