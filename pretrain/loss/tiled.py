"""Memory-efficient (tiled) form of the distributed CLIP loss: never holds the b x B logits.

The loss of row i is `ce_i = lse_j(z_ij) - z_i,offset+i` with z = s * A @ C^T (A: local rows
of one modality, C: gathered rows of the other). `TiledRowCE`, a custom autograd function,
walks the B columns in blocks of `block_size`:
  forward:  per block z_blk (b x k), streaming max / sum-of-exp per row and the positives
            that fall in the block; only one b x k block lives at a time; saves A, C, s and
            the b row maxima and log-sums;
  backward: recomputes each block, dz = g * (softmax_blk - onehot), and accumulates
            dA += s dz @ C_blk, dC_blk = s dz^T @ A, ds += sum(dz * A @ C_blk^T).
Peak extra memory is O(b x block_size) instead of O(b x B). Values and gradients equal the
plain loss (clip.py) up to float rounding; the gradient convention through the all-gather is
the same (clip.py docstring), since the gathered C receives its gradient like any tensor.

Run the tests: `.venv/bin/python -m pytest -q tests/test_loss_tiled.py`.
"""

from __future__ import annotations

from typing import Any

import torch

from pretrain.loss.common import as_scalar, check_features, rank_share
from pretrain.loss.gather import gather_pair, world_info

DEFAULT_BLOCK_SIZE = 4096


def _positives_in_block(b: int, offset: int, start: int, stop: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns within the block) of the positive pairs that fall in columns
    [start, stop): row i's positive is global column offset + i."""
    lo, hi = max(start - offset, 0), min(stop - offset, b)
    rows = torch.arange(lo, max(hi, lo), device=device)
    return rows, rows + (offset - start)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulate in fp32 even for bf16/fp16 features (the exp-sums are the sensitive part),
    in fp64 for fp64 features."""
    return torch.promote_types(x.dtype, torch.float32)


class TiledRowCE(torch.autograd.Function):
    """ce[i] = logsumexp_j(z[i, j]) - z[i, offset + i], z = scale * a @ c.T, in column
    blocks of c. Holding the positive inside the function lets the backward form
    softmax - onehot per block, as the plain loss does: subtracting two separately rounded
    gradients of size ~scale would lose digits at scale 100."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, a: torch.Tensor, c: torch.Tensor, scale: torch.Tensor, offset: int, block_size: int
    ) -> torch.Tensor:
        b = a.shape[0]
        acc = _acc_dtype(a)
        run_max = torch.full((b,), float("-inf"), device=a.device, dtype=acc)
        run_sum = torch.zeros((b,), device=a.device, dtype=acc)
        positive = torch.zeros((b,), device=a.device, dtype=acc)
        for start in range(0, c.shape[0], block_size):
            stop = min(start + block_size, c.shape[0])
            z = (a @ c[start:stop].T).to(acc) * scale.to(acc)  # (b, k)
            rows, cols = _positives_in_block(b, offset, start, stop, a.device)
            positive[rows] = z[rows, cols]
            new_max = torch.maximum(run_max, z.max(dim=1).values)
            # first block: exp(-inf - finite) = 0 multiplies an empty sum, as it should
            run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(z - new_max[:, None]).sum(dim=1)
            run_max = new_max
            del z
        log_sum = torch.log(run_sum)
        # max and log-sum kept apart: exp((z - max) - log_sum) in the backward is as accurate
        # as a softmax; exp(z - lse) loses digits when z and lse are both ~100 (scale 100).
        ctx.save_for_backward(a, c, scale, run_max, log_sum)
        ctx.offset, ctx.block_size = offset, block_size
        return (run_max - positive) + log_sum

    @staticmethod
    def backward(ctx: Any, grad_ce: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        a, c, scale, row_max, log_sum = ctx.saved_tensors
        offset, block_size = ctx.offset, ctx.block_size
        acc = _acc_dtype(a)
        s = scale.to(acc)
        need_a, need_c, need_s = ctx.needs_input_grad[:3]
        grad_a = torch.zeros(a.shape, device=a.device, dtype=acc) if need_a else None
        grad_c = torch.empty(c.shape, device=c.device, dtype=c.dtype) if need_c else None
        grad_s = torch.zeros((), device=a.device, dtype=acc)
        g = grad_ce.to(acc)
        for start in range(0, c.shape[0], block_size):
            stop = min(start + block_size, c.shape[0])
            c_blk = c[start:stop]
            raw = (a @ c_blk.T).to(acc)  # (b, k) unscaled similarities
            dz = torch.exp((raw * s - row_max[:, None]) - log_sum[:, None])  # softmax, this block
            rows, cols = _positives_in_block(a.shape[0], offset, start, stop, a.device)
            dz[rows, cols] -= 1.0  # softmax - onehot
            dz *= g[:, None]  # dL/dz
            if need_s:
                grad_s += (dz * raw).sum()
            dz_s = (dz * s).to(a.dtype)  # dL/d(a @ c^T)
            if need_a:
                grad_a += (dz_s @ c_blk).to(acc)
            if need_c:
                grad_c[start:stop] = dz_s.T @ a
            del raw, dz, dz_s
        return (
            grad_a.to(a.dtype) if need_a else None,
            grad_c,
            grad_s.to(scale.dtype) if need_s else None,
            None,
            None,
        )


def tiled_row_ce(
    a: torch.Tensor, c: torch.Tensor, scale: torch.Tensor, offset: int, block_size: int
) -> torch.Tensor:
    """Per-row cross-entropy of `scale * a @ c.T` with labels `offset + arange(len(a))`,
    without materialising the logits (see module doc)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size}")
    return TiledRowCE.apply(a, c, scale, offset, block_size)


def clip_loss_tiled(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """Same value, gradients and conventions as `clip_loss`, in O(b x block_size) memory.

    Args as `clip_loss`, plus `block_size`: columns (global-batch samples) per block.
    """
    check_features(image_features, text_features)
    scale = as_scalar(logit_scale, image_features, "logit_scale")
    _, world = world_info()
    all_image, all_text, offset = gather_pair(image_features, text_features)
    ce_image = tiled_row_ce(image_features, all_text, scale, offset, block_size)  # image -> text
    ce_text = tiled_row_ce(text_features, all_image, scale, offset, block_size)  # text -> image
    local_sum = (ce_image.sum() + ce_text.sum()) / 2
    return rank_share(local_sum, world, all_image.shape[0])
