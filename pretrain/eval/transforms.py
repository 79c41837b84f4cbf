"""Eval-time image preprocessing: resize the shorter side (bicubic), centre crop, normalise.

CLIP.md section 5's protocol. The training package's ``pretrain.data.eval_transform`` is
used when it exists (one implementation for training-time and offline eval); this module's
own :class:`CenterCropTransform` is the fallback and the reference. Both are picklable, so
DataLoader workers can run them.

    from pretrain.eval.transforms import get_eval_transform
    fn, ident = get_eval_transform(224)   # fn(PIL.Image) -> FloatTensor[3, 224, 224]
"""
from __future__ import annotations

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
        img = img.convert("RGB")
        w, h = img.size
        s = self.image_size
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


class TrainingPackageTransform:
    """``pretrain.data.eval_transform(size)`` built lazily in each process: that function
    returns a closure, which spawn-started DataLoader workers could not unpickle."""

    def __init__(self, image_size: int) -> None:
        self.image_size = int(image_size)
        self._fn: Callable[[Image.Image], torch.Tensor] | None = None

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self._fn is None:
            from pretrain.data import eval_transform

            self._fn = eval_transform(self.image_size)
        return self._fn(img)

    def __getstate__(self) -> dict:
        return {"image_size": self.image_size, "_fn": None}


def get_eval_transform(image_size: int) -> tuple[Callable[[Image.Image], torch.Tensor], str]:
    """The transform and a string that identifies it (part of the feature-cache key)."""
    try:
        from pretrain.data import eval_transform  # noqa: F401  (the training package's, when present)
    except ImportError:
        return CenterCropTransform(image_size), f"pretrain.eval.CenterCropTransform({image_size})"
    return TrainingPackageTransform(image_size), f"pretrain.data.eval_transform({image_size})"
