"""The training objectives' losses, distributed-aware: the contrastive ones (all-gathered
negatives) and the paper's two baselines, captioning and bag of words (arXiv 2103.00020,
Figure 2).

    from pretrain.loss import clip_loss, get_loss
    loss = clip_loss(image_features, text_features, logit_scale)   # plain or distributed
    loss_fn = get_loss("clip_tiled", block_size=4096)                # chosen by run config
    loss_fn = get_loss("clip_ring")    # ring exchange: never holds the gathered batch
    loss = siglip_loss(image_features, text_features, logit_scale, logit_bias)
    loss = captioning_loss(*captioning_model(images, tokens))   # (logits, targets)
    loss = bow_loss(*bow_model(images, tokens))                 # (word_logits, tokens)
    objective_of("bow")    # -> "bow": the model class a loss trains (pretrain.models.OBJECTIVES)

Every loss takes this rank's outputs of the model's forward and follows one gradient convention: the
autograd all-gather sums gradients across ranks and DDP/DeepSpeed average parameter
gradients, which together equal the single-process full-batch gradient (clip.py).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from pretrain.loss.bow import bow_loss
from pretrain.loss.captioning import captioning_loss
from pretrain.loss.clip import clip_loss
from pretrain.loss.gather import gather_features, world_info
from pretrain.loss.ring import clip_loss_ring
from pretrain.loss.siglip import SIGLIP_INIT_BIAS, SIGLIP_INIT_LOG_SCALE, siglip_loss
from pretrain.loss.tiled import clip_loss_tiled

# name -> loss(image_features, text_features, logit_scale, ...). "siglip" also needs the
# model's logit_bias: loss(img, txt, logit_scale, logit_bias). "captioning" and "bow" take
# their model's two outputs.
_LOSSES: dict[str, Callable[..., Any]] = {
    "clip": clip_loss,
    "clip_tiled": clip_loss_tiled,
    "clip_ring": clip_loss_ring,
    "siglip": siglip_loss,
    "captioning": captioning_loss,
    "bow": bow_loss,
}
# the objective (model class, pretrain.models.create_model(objective=...)) each loss trains
_OBJECTIVES: dict[str, str] = {"captioning": "captioning", "bow": "bow"}


def objective_of(name: str) -> str:
    """"contrastive", "captioning" or "bow": what the model trained by loss `name` is."""
    if name not in _LOSSES:
        raise KeyError(f"unknown loss {name!r}; choose one of {list_losses()}")
    return _OBJECTIVES.get(name, "contrastive")


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


__all__ = [
    "bow_loss",
    "captioning_loss",
    "objective_of",
    "SIGLIP_INIT_BIAS",
    "SIGLIP_INIT_LOG_SCALE",
    "clip_loss",
    "clip_loss_ring",
    "clip_loss_tiled",
    "gather_features",
    "get_loss",
    "list_losses",
    "siglip_loss",
    "world_info",
]
