"""Memory-efficient (tiled) form of the distributed CLIP loss: never holds the b x B logits.

The loss of row i is `ce_i = lse_j(z_ij) - z_i,offset+i` with z = s * A @ C^T (A: local rows
of one modality, C: gathered rows of the other). `TiledRowCE`, a custom autograd function,
walks the B columns in blocks of `block_size`:
  forward:  per block z_blk (b x k), streaming max / sum-of-exp per row and the positives
            that fall in the block; only one b x k block lives at a time; saves A, C, s and
            the b row maxima and sums of exp;
  backward: recomputes each block, dz = g * (softmax_blk - onehot), and accumulates
            dA += s dz @ C_blk, dC_blk = s dz^T @ A; ds = sum(dz * A @ C^T) = sum(A * dA) / s.
The scale is folded into the b x d side, z = (sA) @ C^T, as in the plain loss. Each block is
built in place in one b x k buffer: peak extra memory is O(b x block_size) (plus the b x d
and B x d gradients) instead of O(b x B); the default block size gives blocks of about 2^23
elements (32 MiB in fp32). Values and gradients equal the plain loss (clip.py) up to float
rounding; the gradient convention through the all-gather is the same (clip.py docstring),
since the gathered C receives its gradient like any tensor. Cost: the backward recomputes
the logits, 4 matmuls per direction instead of the plain loss's 3.

Run the tests: `.venv/bin/python -m pytest -q tests/test_loss_tiled.py`.
"""

from __future__ import annotations

from typing import Any

import torch

from pretrain.loss.blocks import acc_dtype, auto_block_size, matmul_into, new_row_state, positives_in_block, row_ce
from pretrain.loss.common import as_scalar, check_features, rank_share
from pretrain.loss.gather import gather_pair, world_info


def fold_columns(a_s: torch.Tensor, c: torch.Tensor, run_max: torch.Tensor, run_sum: torch.Tensor,
                 positive: torch.Tensor, offset: int | None, block_size: int) -> None:
    """Fold the logits of rows `a_s` (scale already applied) against columns `c` into the
    rows' streaming log-sum-exp state, in place, one b x block_size block at a time. Row i's
    positive is column `offset + i` of `c` (None: `c` holds no positives)."""
    b, acc = a_s.shape[0], run_sum.dtype
    for start in range(0, c.shape[0], block_size):
        stop = min(start + block_size, c.shape[0])
        z = (a_s @ c[start:stop].T).to(acc)  # (b, k), the only b x k buffer
        if offset is not None:
            rows, cols = positives_in_block(b, offset, start, stop, a_s.device)
            positive[rows] = z[rows, cols]
        new_max = torch.maximum(run_max, z.amax(dim=1))
        # first block: exp(-inf - finite) = 0 multiplies an empty sum, as it should
        run_sum.mul_(torch.exp(run_max - new_max)).add_(z.sub_(new_max[:, None]).exp_().sum(dim=1))
        run_max.copy_(new_max)
        del z


def backprop_columns(a_s: torch.Tensor, c: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor,
                     g: torch.Tensor, offset: int | None, block_size: int, grad_a: torch.Tensor,
                     grad_c: torch.Tensor | None, accumulate_c: bool) -> None:
    """Backward of `fold_columns` for per-row loss gradients `g`: recomputes each block,
    dz = g * (softmax - onehot), and adds dz @ c to `grad_a` (= dL/d(sA)); writes (or, with
    `accumulate_c`, adds) dz^T @ a_s (= dL/dc) into `grad_c` unless it is None."""
    acc = grad_a.dtype
    # The softmax is exp(z - max) / sum, never exp(z - lse): with z and lse both ~100
    # (scale 100) the latter loses digits that a softmax keeps.
    g_over_sum = (g / row_sum)[:, None]
    for start in range(0, c.shape[0], block_size):
        stop = min(start + block_size, c.shape[0])
        c_blk = c[start:stop]
        # dz = dL/dz, built in place in the one b x k buffer
        dz = (a_s @ c_blk.T).to(acc).sub_(row_max[:, None]).exp_().mul_(g_over_sum)
        if offset is not None:
            rows, cols = positives_in_block(a_s.shape[0], offset, start, stop, a_s.device)
            dz[rows, cols] -= g[rows]
        dz = dz.to(a_s.dtype)
        matmul_into(grad_a, dz, c_blk, accumulate=True)
        if grad_c is not None:
            matmul_into(grad_c[start:stop], dz.T, a_s, accumulate=accumulate_c)  # = s dz^T A
        del dz


class TiledRowCE(torch.autograd.Function):
    """ce[i] = logsumexp_j(z[i, j]) - z[i, offset + i], z = scale * a @ c.T, in column
    blocks of c. The positive is held inside the function so that the backward forms
    softmax - onehot per block and the positive's gradient reaches the gathered copy of c,
    exactly as in the plain loss. Under autocast (bf16 on GPU) the backward re-enters the
    forward's autocast state, so the recomputed blocks equal the forward's."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, a: torch.Tensor, c: torch.Tensor, scale: torch.Tensor, offset: int, block_size: int
    ) -> torch.Tensor:
        b = a.shape[0]
        acc = acc_dtype(a)
        a_s = a * scale  # scale folded into the b x d side, as the plain loss does: (s A) C^T
        run_max, run_sum, positive = new_row_state(b, a.device, acc)
        fold_columns(a_s, c, run_max, run_sum, positive, offset, block_size)
        # The backward normalises with exp(z - max) / sum, never exp(z - lse): with z and lse
        # both ~100 (scale 100) the latter loses digits that a softmax keeps.
        ctx.save_for_backward(a, c, scale, run_max, run_sum)
        ctx.offset, ctx.block_size = offset, block_size
        device_type = a.device.type
        ctx.autocast = (
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )
        return row_ce(run_max, run_sum, positive)

    @staticmethod
    def backward(ctx: Any, grad_ce: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        device_type, enabled, dtype = ctx.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            return TiledRowCE._backward(ctx, grad_ce)

    @staticmethod
    def _backward(ctx: Any, grad_ce: torch.Tensor) -> tuple[Any, ...]:
        a, c, scale, row_max, row_sum = ctx.saved_tensors
        offset, block_size = ctx.offset, ctx.block_size
        acc = acc_dtype(a)
        need_a, need_c, need_s = ctx.needs_input_grad[:3]
        a_s = a * scale
        g = grad_ce.to(acc)
        grad_a = torch.zeros(a.shape, device=a.device, dtype=acc)  # dL/d(sA); also gives dL/ds
        grad_c = torch.empty(c.shape, device=c.device, dtype=c.dtype) if need_c else None
        backprop_columns(a_s, c, row_max, row_sum, g, offset, block_size, grad_a, grad_c, accumulate_c=False)
        # z = (sA) C^T: dL/dA = s dL/d(sA), dL/ds = sum(A * dL/d(sA)); dot and mul_ make no
        # b x d temporaries
        grad_s = torch.dot(a.to(acc).reshape(-1), grad_a.reshape(-1)) if need_s else None
        return (
            grad_a.mul_(scale.to(acc)).to(a.dtype) if need_a else None,
            grad_c,
            grad_s.to(scale.dtype) if need_s else None,
            None,
            None,
        )


def tiled_row_ce(
    a: torch.Tensor, c: torch.Tensor, scale: torch.Tensor, offset: int, block_size: int | None = None
) -> torch.Tensor:
    """Per-row cross-entropy of `scale * a @ c.T` with labels `offset + arange(len(a))`,
    without materialising the logits (see module doc). `block_size=None`: auto_block_size."""
    if block_size is None:
        block_size = auto_block_size(a.shape[0], c.shape[0])
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size}")
    return TiledRowCE.apply(a, c, scale, offset, block_size)


def clip_loss_tiled(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    block_size: int | None = None,
) -> torch.Tensor:
    """Same value, gradients and conventions as `clip_loss`, in O(b x block_size) memory.

    Args as `clip_loss`, plus `block_size`: columns (global-batch samples) per block;
    None picks `auto_block_size` (blocks of about 2^23 logits).
    """
    check_features(image_features, text_features)
    scale = as_scalar(logit_scale, image_features, "logit_scale")
    _, world = world_info()
    all_image, all_text, offset = gather_pair(image_features, text_features)
    local_sum = clip_tiled_local_sum(
        image_features, text_features, all_image, all_text, offset, scale, block_size
    )
    return rank_share(local_sum, world, all_image.shape[0])


def clip_tiled_local_sum(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    all_image: torch.Tensor,
    all_text: torch.Tensor,
    offset: int,
    scale: torch.Tensor,
    block_size: int | None = None,
) -> torch.Tensor:
    """Tiled counterpart of `clip.clip_local_sum` (no collectives)."""
    ce_image = tiled_row_ce(image_features, all_text, scale, offset, block_size)  # image -> text
    ce_text = tiled_row_ce(text_features, all_image, scale, offset, block_size)  # text -> image
    return (ce_image.sum() + ce_text.sum()) / 2
