"""Image transforms for CLIP training and evaluation, written with PIL/numpy/torch (no torchvision).

Every stage is a small pure function, tested alone (tests/test_data_transforms.py) and inside
the loader (tests/test_data_loader.py):

- ``decode_rgb(data, min_size)``: decode bytes to an RGB PIL image; JPEGs go through
  libjpeg-turbo (simplejpeg; PIL's draft mode as the fallback) and are decoded at a reduced
  DCT scale (k/8) when ``min_size`` allows it.
- ``random_square_crop_box(w, h, rng, scale)``: the paper's random square crop
  (random-resized-crop with aspect ratio fixed to 1).
- ``center_crop_box``, ``resize_shorter_side_size``: the eval-time geometry.
- ``crop_resize``: crop a box and resize it to a square (bicubic, antialiased).
- ``to_normalized_tensor``: uint8 RGB -> float [3, H, W] normalised with CLIP's mean/std.

``train_transform(size, crop_scale)`` and ``eval_transform(size)`` (an `EvalTransform`: OpenAI
CLIP's eval preprocessing, the project's only one) chain them.

    tf = train_transform(224, (0.9, 1.0))
    x = tf(jpeg_bytes, sample_rng(seed, epoch, key))   # FloatTensor [3, 224, 224]
"""
from __future__ import annotations

import io
import math
import random
from typing import Callable, Union

import numpy as np
import simplejpeg
import torch
from PIL import Image

from pretrain.shards.images import checked_size

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Union[bytes, bytearray, memoryview, Image.Image, np.ndarray]
Box = tuple[int, int, int, int]  # (left, top, right, bottom), right/bottom exclusive


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The augmentation RNG of one sample: a function of (seed, epoch, key) only.

    Not of worker state, so a resumed run or a gradient-caching re-run sees the same crop.
    A string seed is hashed with SHA-512 by ``random.Random``: stable across processes.
    """
    return random.Random(f"{int(seed)}/{int(epoch)}/{key}")


def open_image(data: ImageInput) -> Image.Image:
    """A lazily decoded PIL image (only the header is read) from bytes, an array or an image."""
    if isinstance(data, Image.Image):
        return data
    if isinstance(data, np.ndarray):
        return Image.fromarray(data)
    return Image.open(io.BytesIO(bytes(data)))


def _jpeg_bytes(data: ImageInput) -> bytes | None:
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        return raw if raw[:2] == b"\xff\xd8" else None
    return None


def header_size(data: ImageInput) -> tuple[int, int]:
    """(width, height) from the header only; encoded bytes must pass the shards' pixel cap
    (pretrain.shards.images: a decompression bomb raises before any pixel is decoded)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return checked_size(bytes(data))
    return open_image(data).size


def decode_rgb(data: ImageInput, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode to RGB. With ``min_size=(w, h)``, a JPEG is decoded at the smallest DCT scale
    whose result is still at least ``min_size``: much cheaper than a full decode when the
    target is far smaller than the stored image."""
    mw, mh = (max(1, int(min_size[0])), max(1, int(min_size[1]))) if min_size is not None else (0, 0)
    if isinstance(data, (bytes, bytearray, memoryview)):
        checked_size(bytes(data))  # the shards' pixel cap, before any pixel is decoded (a bomb raises)
    jpeg = _jpeg_bytes(data)
    if jpeg is not None:
        try:
            return Image.fromarray(simplejpeg.decode_jpeg(jpeg, colorspace="RGB", min_width=mw,
                                                         min_height=mh))
        except Exception:  # noqa: BLE001 - e.g. CMYK or damaged: PIL decodes or raises below
            pass
    img = open_image(data)
    if min_size is not None and img.format == "JPEG":
        img.draft("RGB", (mw, mh))  # PIL's reduced decode: scales 1/2, 1/4, 1/8
    img = img if img.mode == "RGB" else img.convert("RGB")
    img.load()
    return img


def random_square_crop_box(w: int, h: int, rng: random.Random,
                           scale: tuple[float, float] = (0.9, 1.0)) -> Box:
    """A square box covering a fraction of the image area drawn uniformly from ``scale``.

    The fraction is drawn from the part of ``scale`` that a square can reach in a w x h image
    (at most min(w,h)^2 / (w*h)); when even ``scale[0]`` is out of reach the box is the
    largest square. Position uniform over the valid offsets.
    """
    lo, hi = scale
    reach = min(w, h) ** 2 / float(w * h)
    if lo >= reach:
        side = min(w, h)
    else:
        frac = rng.uniform(lo, min(hi, reach))
        side = min(min(w, h), max(1, int(round(math.sqrt(frac * w * h)))))
    x0 = rng.randint(0, w - side)
    y0 = rng.randint(0, h - side)
    return (x0, y0, x0 + side, y0 + side)


def resize_shorter_side_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(w', h') with the shorter side equal to ``size`` and the aspect ratio kept, the longer
    side truncated to an integer: torchvision's ``Resize(size)`` rule, which OpenAI's CLIP
    preprocessing uses (docs/eval_transform.md)."""
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


def center_crop_box(w: int, h: int, size: int) -> Box:
    """The centred size x size box, offsets ``int(round((w - size) / 2))`` (Python's
    round-half-to-even) as torchvision's ``CenterCrop``, which OpenAI's CLIP preprocessing uses."""
    left = int(round((w - size) / 2.0))
    top = int(round((h - size) / 2.0))
    return (left, top, left + size, top + size)


def crop_resize(img: Image.Image, box: tuple[float, float, float, float], size: int) -> Image.Image:
    """Crop ``box`` (may be fractional) and resize it to size x size with antialiased bicubic."""
    return img.resize((size, size), Image.BICUBIC, box=box)


_MEAN = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1)
_STD = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1)
# (v / 255 - mean) / std for every uint8 value v, per channel: one table lookup per pixel is
# ~1.5x faster than the arithmetic and gives bit-identical float32 results.
_LUT = ((torch.arange(256, dtype=torch.float32).view(1, 256).div(255.0) - _MEAN) / _STD).numpy()


def to_normalized_tensor(img: Image.Image | np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 RGB [H, W, 3] -> float32 [3, H, W]: (x / 255 - mean) / std, CLIP's mean/std.

    ``out``: a contiguous float32 [3, H, W] tensor to write into (e.g. a row of a batch
    buffer): no per-sample allocation, whose page faults cost as much as the arithmetic."""
    if isinstance(img, Image.Image) and img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {arr.shape}")
    shape = (3, arr.shape[0], arr.shape[1])
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape {shape}; got "
                         f"{out.dtype} {tuple(out.shape)}")
    planes = out.numpy()
    for c in range(3):
        np.take(_LUT[c], arr[..., c], out=planes[c])
    return out


def train_transform(image_size: int, crop_scale: tuple[float, float] = (0.9, 1.0),
                    reduced_decode: bool = True) -> Callable[..., torch.Tensor]:
    """``f(image, rng, out=None) -> FloatTensor[3, S, S]``: random square crop, bicubic
    resize, normalise (into ``out`` when given, see ``to_normalized_tensor``).

    The crop box is drawn from the header size before decoding, so the JPEG can be decoded at
    the smallest scale that still gives the crop at least ``image_size`` pixels per side.
    """
    lo, hi = float(crop_scale[0]), float(crop_scale[1])
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
    size = int(image_size)

    def apply(data: ImageInput, rng: random.Random, out: torch.Tensor | None = None) -> torch.Tensor:
        w, h = header_size(data)
        box = random_square_crop_box(w, h, rng, (lo, hi))
        side = box[2] - box[0]
        need = (math.ceil(w * size / side), math.ceil(h * size / side)) if reduced_decode else None
        img = decode_rgb(data, need)
        fx, fy = img.size[0] / w, img.size[1] / h  # < 1 when decoded at a reduced scale
        scaled = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
        return to_normalized_tensor(crop_resize(img, scaled, size), out)

    return apply


class EvalTransform:
    """``f(image) -> FloatTensor[3, S, S]``: OpenAI CLIP's eval preprocessing, the one eval
    transform of the project (zero-shot and retrieval in the trainer and in ``clip-eval``,
    the CLIP-score filter of the data build). Picklable, so DataLoader workers can run it.

    Resize the shorter side to S (bicubic, longer side truncated: `resize_shorter_side_size`;
    no resize when the shorter side is already S), centre crop S x S (`center_crop_box`),
    convert to RGB, normalise with CLIP's mean/std: torchvision's ``Resize(S, BICUBIC)``,
    ``CenterCrop(S)``, ``ToTensor()``, ``Normalize(CLIP_MEAN, CLIP_STD)`` in that order, as in
    OpenAI's release (docs/eval_transform.md). The image is resized in its own mode, as PIL
    does under torchvision (grey stays one channel until the RGB conversion).

    Accepts JPEG/PNG bytes, a PIL image or a uint8 array (H, W[, 3]). ``reduced_decode=True``
    trades exactness for speed: a JPEG much larger than the target is decoded at a reduced
    DCT scale first (see `decode_rgb`); the default decodes in full, as OpenAI's code does.
    """

    def __init__(self, image_size: int, reduced_decode: bool = False) -> None:
        if int(image_size) <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.reduced_decode = bool(reduced_decode)

    @property
    def ident(self) -> str:
        """Names the output exactly (part of the eval feature-cache key): bump the version
        whenever the pixels this transform produces change."""
        return f"pretrain.data.EvalTransform({self.image_size},reduced_decode={self.reduced_decode})/v2"

    def __call__(self, data: ImageInput) -> torch.Tensor:
        size = self.image_size
        rw, rh = resize_shorter_side_size(*header_size(data), size)  # from the header: nothing decoded yet
        # In full (as OpenAI's code, and in the image's own mode), or at a reduced JPEG scale.
        img = decode_rgb(data, (rw, rh)) if self.reduced_decode else open_image(data)
        if img.size != (rw, rh):
            img = img.resize((rw, rh), Image.BICUBIC)
        img = img.crop(center_crop_box(rw, rh, size))
        return to_normalized_tensor(img if img.mode == "RGB" else img.convert("RGB"))


def eval_transform(image_size: int, reduced_decode: bool = False) -> EvalTransform:
    """The eval transform for ``image_size`` (see `EvalTransform`)."""
    return EvalTransform(image_size, reduced_decode)
