"""The captioning objective's loss: token-level cross-entropy of the caption given the image
(CLIP paper, arXiv 2103.00020, Figure 2's "Transformer Language Model" baseline).

Input: the captioning model's ``(logits [n, vocab], targets [n])`` for this rank's caption
positions (pretrain/models/captioning.py). The mean is over every caption token (and EOT)
of the global batch: rank r returns ``world_size / N * sum of its n token losses``, N the
global token count (all-reduced, no gradient), so that averaging the ranks' losses and
parameter gradients (DDP/DeepSpeed) gives the full-batch token mean exactly, whatever the
caption lengths on each rank (the package convention, common.py).

Run the tests: `.venv/bin/python -m pytest -q tests/test_loss_objectives.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.loss.gather import global_sum, world_info


def captioning_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `targets` [n] (token ids) under `logits` [n, vocab], normalised by
    the global token count. A global batch without any caption token is an error."""
    if logits.dim() != 2 or targets.dim() != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"captioning_loss takes logits [n, vocab] and targets [n]; got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    _, world = world_info()
    total = global_sum(torch.tensor(float(targets.shape[0]), device=logits.device))
    if float(total) == 0:
        raise ValueError("captioning_loss: the global batch holds no caption token")
    local_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
    return local_sum * (world / total)
