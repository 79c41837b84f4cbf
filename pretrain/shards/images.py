"""The pixel cap on images in shards: one rule for the data build's filter, the trainer's
decoder and evaluation, checked from the image header before any pixel is decoded.

    from pretrain.shards.images import MAX_PIXELS, checked_size, DecompressionBombError
    w, h = checked_size(data)           # raises DecompressionBombError / NotAnImageError

A PNG or JPEG header can declare 100 megapixels in a few hundred bytes (a decompression
bomb); decoding it costs ~300 MB per copy and per worker. The cap is Pillow's own default
``Image.MAX_IMAGE_PIXELS`` (89,478,485 px, about 0.25 GiB of RGB), above which Pillow only
warns (it raises at twice that): here it is a hard limit, whatever another library in the
process did to Pillow's global.
"""
from __future__ import annotations

import io
import warnings

from PIL import Image

MAX_PIXELS = 89_478_485


class NotAnImageError(ValueError):
    """The bytes are not an image Pillow can identify (or declare a zero size)."""


class DecompressionBombError(ValueError):
    """The image declares more pixels than the cap."""


def checked_size(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header alone; raises unless 0 < w * h <= max_pixels."""
    if not data:
        raise NotAnImageError("empty image data")
    size = _jpeg_header_size(data)
    if size is not None:
        w, h = size
    else:
        w, h = _pil_header_size(data)
    if w <= 0 or h <= 0:
        raise NotAnImageError(f"image declares size {w}x{h}")
    if w * h > max_pixels:
        raise DecompressionBombError(f"image declares {w}x{h} = {w * h:,} pixels, over the cap of {max_pixels:,}")
    return w, h


def _jpeg_header_size(data: bytes) -> tuple[int, int] | None:
    """libjpeg-turbo's header parse (a few microseconds: the trainer calls this per sample)."""
    if data[:2] != b"\xff\xd8":
        return None
    try:
        import simplejpeg

        h, w, _, _ = simplejpeg.decode_jpeg_header(bytes(data))
    except Exception:  # noqa: BLE001 - a header libjpeg refuses: Pillow reads or rejects it
        return None
    return int(w), int(h)


def _pil_header_size(data: bytes) -> tuple[int, int]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(bytes(data))) as img:
                w, h = img.size
    except Image.DecompressionBombError as exn:
        raise DecompressionBombError(str(exn)) from exn
    except Exception as exn:  # noqa: BLE001 - Pillow raises many kinds on junk
        raise NotAnImageError(f"not an image: {type(exn).__name__}: {exn}") from exn
    return w, h
