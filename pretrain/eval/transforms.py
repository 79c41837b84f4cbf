"""Eval-time image preprocessing: resize the shorter side (bicubic), centre crop, normalise.

CLIP.md section 5's protocol. The trainer's periodic eval and the offline CLI both build
their eval sets through this module, so they preprocess identically. A JPEG that is much
larger than the target is decoded at a reduced scale (PIL draft mode: libjpeg's DCT
scaling by 1/2, 1/4, 1/8, never below the target size) before the bicubic resize.
Picklable, so DataLoader workers can run it.

    from pretrain.eval.transforms import get_eval_transform
    fn, ident = get_eval_transform(224)   # fn(PIL.Image) -> FloatTensor[3, 224, 224]
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CenterCropTransform:
    """PIL image (any mode) -> normalised float tensor [3, size, size]."""

    def __init__(self, image_size: int) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        s = self.image_size
        if img.format == "JPEG":  # still undecoded: let libjpeg shrink it first
            w, h = img.size
            img.draft(None, (math.ceil(w * s / min(w, h)), math.ceil(h * s / min(w, h))))
        img = img.convert("RGB")
        w, h = img.size
        scale = s / min(w, h)
        # round() then max(s, .) keeps the shorter side exactly s and the longer >= s.
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - s) // 2, (nh - s) // 2
        img = img.crop((left, top, left + s, top + s))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(CLIP_STD).view(3, 1, 1)
        return (x - mean) / std


def get_eval_transform(image_size: int) -> tuple[Callable[[Image.Image], torch.Tensor], str]:
    """The transform and a string that identifies it (part of the feature-cache key)."""
    return CenterCropTransform(image_size), f"pretrain.eval.CenterCropTransform({image_size})/v1"
