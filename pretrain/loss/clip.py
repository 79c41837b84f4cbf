"""CLIP's symmetric contrastive (InfoNCE) loss, with all-gathered negatives across ranks.

Outside a process group this is the plain N x N loss of the paper:
    logits = s * I @ T^T,  loss = (CE(logits, arange N) + CE(logits^T, arange N)) / 2.
Inside one, every rank all-gathers the features of every rank (with gradient, gather.py) and
computes only its local rows: its b images against all B texts and its b texts against all
B images, labels offset by its position in the global batch. Memory is O(b x B), never B^2.

Run the tests: `.venv/bin/python -m pytest -q tests/test_loss.py tests/test_loss_dist.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.loss.common import as_scalar, check_features, rank_share
from pretrain.loss.gather import gather_pair, world_info


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Symmetric contrastive loss of this rank's rows against the global batch.

    Args:
        image_features: [b, d] this rank's image embeddings (L2-normalised by the model).
        text_features: [b, d] the matching text embeddings, row i pairs with image i.
        logit_scale: the temperature, already exponentiated (0-dim or shape [1] tensor).

    Returns a 0-dim tensor: `world_size / B * sum over local rows of (CE_img + CE_txt) / 2`,
    which is the mean over the local rows when every rank has the same b (see common.py).

    Gradient convention (tested in tests/test_loss_dist.py):
    - the autograd all_gather's backward SUMS the gradients every rank computed for a slice,
      so the gradient w.r.t. rank r's own features is world_size x the full-batch
      gradient w.r.t. those rows;
    - DDP / DeepSpeed then AVERAGE parameter gradients over ranks, which divides that
      factor out: the averaged parameter gradients (and the averaged logit-scale gradient)
      equal the single-process full-batch gradients, and the mean of the ranks' losses
      equals the full-batch loss. Do not also rescale the loss by world_size.
    """
    check_features(image_features, text_features)
    scale = as_scalar(logit_scale, image_features, "logit_scale")
    _, world = world_info()
    all_image, all_text, offset = gather_pair(image_features, text_features)
    local_sum = clip_local_sum(image_features, text_features, all_image, all_text, offset, scale)
    return rank_share(local_sum, world, all_image.shape[0])


def clip_local_sum(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    all_image: torch.Tensor,
    all_text: torch.Tensor,
    offset: int,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Sum over this rank's rows of (CE_img + CE_txt) / 2, given the gathered features and
    this rank's offset in them (no collectives; benchmarks call it with simulated ones)."""
    b = image_features.shape[0]
    labels = torch.arange(offset, offset + b, device=image_features.device)
    logits_image = scale * image_features @ all_text.T  # (b, B): local images vs all texts
    logits_text = scale * text_features @ all_image.T  # (b, B): local texts vs all images
    return (
        F.cross_entropy(logits_image, labels, reduction="sum")
        + F.cross_entropy(logits_text, labels, reduction="sum")
    ) / 2
