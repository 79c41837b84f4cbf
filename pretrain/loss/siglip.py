"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023), with its distributed all-gather form.

Full batch of B pairs: logits z_ij = s * img_i . txt_j + bias, label y_ij = +1 if i == j else
-1, loss = -(1 / B) * sum_ij log sigmoid(y_ij z_ij) (every pair counts once; normalised by
the number of images, as in the paper). Distributed: each rank gathers the texts of every
rank (with gradient, gather.py; images stay local) and sums its b local images against all
B texts, so the ranks together cover every pair exactly once. The return value follows the
package convention (common.py): world_size / B x the local sum, so that averaging the
ranks' losses and parameter gradients (DDP/DeepSpeed) gives the full-batch ones.

The paper initialises the logit scale at exp(log 10) = 10 and the bias at -10; the model or
trainer holds them as learnable [1]-shaped parameters (`SIGLIP_INIT_LOG_SCALE`,
`SIGLIP_INIT_BIAS`) and passes them here.

Run the tests: `.venv/bin/python -m pytest -q tests/test_loss_siglip.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pretrain.loss.common import as_scalar, check_features, rank_share
from pretrain.loss.gather import gather_features, world_info

SIGLIP_INIT_LOG_SCALE = math.log(10.0)
SIGLIP_INIT_BIAS = -10.0


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
) -> torch.Tensor:
    """Sigmoid loss of this rank's images against the texts of the global batch.

    Args:
        image_features, text_features: [b, d] this rank's pairs (L2-normalised).
        logit_scale: temperature, already exponentiated (0-dim or [1] tensor, or float).
        logit_bias: additive bias of every logit (0-dim or [1] tensor, or float).

    Gradient convention as `clip_loss`: the gradient w.r.t. this rank's text features is
    world_size x the full-batch one (the all-gather backward sums), its image features get
    world_size x too (the loss is scaled by world_size / B), and rank-averaged parameter,
    scale and bias gradients equal the full-batch ones.
    """
    check_features(image_features, text_features)
    scale = as_scalar(logit_scale, image_features, "logit_scale")
    bias = as_scalar(logit_bias, image_features, "logit_bias")
    _, world = world_info()
    all_text, offset = gather_features(text_features)
    b, total = image_features.shape[0], all_text.shape[0]
    logits = scale * image_features @ all_text.T + bias  # (b, B)
    # y_ij z_ij: -z everywhere, +z on this rank's positives (columns offset .. offset + b)
    signs = torch.full_like(logits, -1.0)
    rows = torch.arange(b, device=logits.device)
    signs[rows, rows + offset] = 1.0
    local_sum = -F.logsigmoid(signs * logits).sum()
    return rank_share(local_sum, world, total)
