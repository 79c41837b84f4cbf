"""FLIP random patch dropout for ViT towers (Li et al. 2023, "Scaling Language-Image
Pre-training via Masking", arXiv 2212.00794): in training, each sample keeps a random
subset of its patch tokens (the class token is always kept), so the transformer runs on
fewer tokens; at eval, and at rate 0.0, the tokens pass through unchanged.

    from pretrain.models.patch_dropout import drop_patches
    y = drop_patches(x, 0.5, generator=torch.Generator().manual_seed(0))  # (B, 1+k, W)
"""
from __future__ import annotations

import torch


def kept_patches(num_patches: int, rate: float) -> int:
    """How many of ``num_patches`` patch tokens a sample keeps at drop ``rate`` (at least 1)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"patch dropout rate must be in [0, 1), got {rate!r}")
    return max(1, int(num_patches * (1.0 - rate)))


def drop_patches(x: torch.Tensor, rate: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``x``: (B, 1 + N, W) with the class token first. Returns (B, 1 + k, W) with
    k = ``kept_patches(N, rate)``: a different random subset of patches per sample, kept in
    their original order (positional embeddings are already added, so order is cosmetic)."""
    if rate == 0.0:
        return x
    b, n = x.shape[0], x.shape[1] - 1
    keep = kept_patches(n, rate)
    scores = torch.rand(b, n, generator=generator, device=generator.device if generator else x.device)
    idx = scores.to(x.device).topk(keep, dim=1).indices.sort(dim=1).values + 1  # (B, k), skip cls
    patches = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :1], patches], dim=1)
