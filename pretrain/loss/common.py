"""Input checks and the loss normalisation shared by every contrastive loss of this package.

Normalisation (all losses here): rank r returns `world_size / B * sum of its local rows'
losses` (B = global batch). With equal local batches that is just the mean over the local
rows; with unequal ones it is what makes "average the ranks' losses / gradients" (DDP,
DeepSpeed) equal the full-batch mean exactly.
"""

from __future__ import annotations

import torch


def check_features(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    """Raise a clear error unless both are [b, d] with the same b and d."""
    if image_features.dim() != 2 or text_features.dim() != 2:
        raise ValueError(
            "features must be 2-D [batch, dim]; got image "
            f"{tuple(image_features.shape)} and text {tuple(text_features.shape)}"
        )
    if image_features.shape != text_features.shape:
        raise ValueError(
            "image and text features must have the same shape; got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )


def as_scalar(value: torch.Tensor | float, like: torch.Tensor, name: str) -> torch.Tensor:
    """A 0-dim tensor from a float, a 0-dim tensor or a one-element tensor (the model holds
    its logit scale as shape [1], docs/models.md); keeps the autograd graph."""
    if not torch.is_tensor(value):
        return torch.tensor(float(value), dtype=like.dtype, device=like.device)
    if value.numel() != 1:
        raise ValueError(f"{name} must hold one element; got shape {tuple(value.shape)}")
    return value.reshape(())


def rank_share(local_sum: torch.Tensor, world: int, total: int) -> torch.Tensor:
    """This rank's share of the global mean, times world_size (see module docstring)."""
    return local_sum * (world / total)
