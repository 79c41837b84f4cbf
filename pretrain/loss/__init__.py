"""Contrastive losses for CLIP pretraining, distributed-aware (all-gathered negatives).

    from pretrain.loss import clip_loss, get_loss
    loss = clip_loss(image_features, text_features, logit_scale)   # plain or distributed
    loss_fn = get_loss("clip")                                       # chosen by run config

Every loss takes this rank's [b, d] features and follows one gradient convention: the
autograd all-gather sums gradients across ranks and DDP/DeepSpeed average parameter
gradients, which together equal the single-process full-batch gradient (clip.py).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from pretrain.loss.clip import clip_loss
from pretrain.loss.gather import gather_features, world_info

_LOSSES: dict[str, Callable[..., Any]] = {
    "clip": clip_loss,
}


def list_losses() -> list[str]:
    """Names accepted by `get_loss`."""
    return sorted(_LOSSES)


def get_loss(name: str, **options: Any) -> Callable[..., Any]:
    """The loss function registered as `name`, with keyword `options` bound (e.g.
    `get_loss("clip_tiled", block_size=4096)`)."""
    if name not in _LOSSES:
        raise KeyError(f"unknown loss {name!r}; choose one of {list_losses()}")
    fn = _LOSSES[name]
    return functools.partial(fn, **options) if options else fn


__all__ = ["clip_loss", "gather_features", "get_loss", "list_losses", "world_info"]
