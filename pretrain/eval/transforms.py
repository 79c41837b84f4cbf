"""Eval-time image preprocessing for pretrain.eval: OpenAI CLIP's (resize the shorter side,
bicubic; centre crop; normalise with CLIP's mean/std).

The transform itself is `pretrain.data.transforms.EvalTransform`, the project's one eval
transform: the trainer's periodic eval (pretrain/train/evaluation.py) and the offline CLI
(`clip-eval`) both build their eval sets through `pretrain.eval.load_eval_dataset`, which
takes it from here, and the data build's CLIP-score filter uses the same class. Its rules and
why they are OpenAI's: docs/eval_transform.md; the test that both eval paths feed the model
identical tensors: tests/test_eval_transform_paths.py.

    from pretrain.eval.transforms import get_eval_transform
    fn, ident = get_eval_transform(224)   # fn(PIL.Image) -> FloatTensor[3, 224, 224]
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from pretrain.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform

__all__ = ["CLIP_MEAN", "CLIP_STD", "get_eval_transform"]


def get_eval_transform(image_size: int) -> tuple[Callable[[Image.Image], torch.Tensor], str]:
    """The transform and a string that identifies it (part of the feature-cache key)."""
    transform = EvalTransform(image_size)
    return transform, transform.ident
