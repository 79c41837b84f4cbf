"""Ring-exchange form of the distributed CLIP loss: no rank ever holds the gathered batch.

The all-gather losses (clip.py, tiled.py) hold every rank's features and their gradients,
2 x B x d per tower: at B = 32,768 that floor alone outweighs everything else the tiled loss
keeps. Here (the scheme of Inf-CL, arXiv 2410.17243) the ranks pass their (image, text)
feature blocks around a ring instead. At step k rank r holds the block of rank r - k and
folds it into its rows' streaming log-sum-exp (tiled.py's `fold_columns`) while the next
block is already in flight. The backward runs the ring again: each travelling block carries
two accumulators, the gradient of every rank's loss with respect to that block's features,
and after W hops the block, with its full column gradient, is back at its owner. Per rank
this holds its own b x d features, two blocks in flight and their gradient accumulators,
and one logit block: O(b x d + b x block_size), independent of W and B.

Values and gradients equal `clip_loss` (fp32, 1e-5) under the same conventions (clip.py):
rank r returns `world / B * sum of its rows' (CE_img + CE_txt) / 2`, and the gradient of its
own features is that of the sum of all ranks' losses. Cost: the tiled loss's 4 matmuls per
direction, plus W - 1 hops of 2 x b x d features (forward) and of features + gradients
(backward), point to point, overlapped with the matmuls in the forward. Unequal local batch
sizes are supported (one extra all-gather of the sizes). Every rank must call the forward
and the backward (as with any collective).

Run the tests: `.venv/bin/python -m pytest -q tests/test_loss_ring.py`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist

from pretrain.loss.common import as_scalar, check_features, rank_share
from pretrain.loss.gather import gather_sizes, world_info
from pretrain.loss.tiled import (
    _acc_dtype,
    auto_block_size,
    backprop_columns,
    fold_columns,
    new_row_state,
    row_ce,
)

FEATURES_TAG, GRADS_TAG = 17, 18  # separate tags: a block's features and gradients may cross


class Ring(Protocol):
    """Who holds what on the ring, and how a block moves one hop (rank r -> r + 1)."""

    rank: int
    world: int
    sizes: list[int]  # local rows of every rank

    def start_shift(self, tensor: torch.Tensor, recv_rows: int, tag: int) -> Any:
        """Send `tensor` to the next rank and start receiving `recv_rows` rows of the same
        width from the previous one; returns a handle for `finish_shift`."""

    def finish_shift(self, handle: Any) -> torch.Tensor:
        """Wait for a `start_shift` and return the received tensor."""


class ProcessGroupRing:
    """The ring of a torch.distributed process group (gloo on CPU, NCCL on GPU), point to
    point with `batch_isend_irecv`."""

    def __init__(self, local_rows: int, device: torch.device, group: Any = None) -> None:
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.sizes = gather_sizes(local_rows, device) if group is None else _group_sizes(local_rows, device, group)

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def start_shift(self, tensor: torch.Tensor, recv_rows: int, tag: int) -> Any:
        send = tensor.contiguous()
        recv = send.new_empty((recv_rows,) + tuple(send.shape[1:]))
        ops = [dist.P2POp(dist.isend, send, self._global((self.rank + 1) % self.world), self.group, tag),
               dist.P2POp(dist.irecv, recv, self._global((self.rank - 1) % self.world), self.group, tag)]
        return dist.batch_isend_irecv(ops), send, recv

    def finish_shift(self, handle: Any) -> torch.Tensor:
        requests, _send, recv = handle  # _send stays referenced until the send completes
        for req in requests:
            req.wait()
        return recv


def _group_sizes(n: int, device: torch.device, group: Any) -> list[int]:
    local = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, local, group=group)
    return [int(s.item()) for s in sizes]


class RingCLIP(torch.autograd.Function):
    """(ce_image, ce_text) of this rank's rows against every rank's columns, by ring."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, ring: Ring, block_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, d = image.shape
        acc = _acc_dtype(image)
        img_s, txt_s = image * scale, text * scale
        state_i = new_row_state(b, image.device, acc)  # image rows vs text columns
        state_t = new_row_state(b, image.device, acc)  # text rows vs image columns
        block = torch.cat([image, text], dim=1)  # what travels: (rows, 2d)
        for k in range(ring.world):
            src = (ring.rank - k) % ring.world
            pending = None
            if k + 1 < ring.world:  # next block in flight while this one is folded in
                pending = ring.start_shift(block, ring.sizes[(src - 1) % ring.world], FEATURES_TAG)
            positives = 0 if k == 0 else None  # own block: row i's positive is column i
            fold_columns(img_s, block[:, d:], *state_i, positives, block_size)
            fold_columns(txt_s, block[:, :d], *state_t, positives, block_size)
            if pending is not None:
                block = ring.finish_shift(pending)
        ctx.save_for_backward(image, text, scale, state_i[0], state_i[1], state_t[0], state_t[1])
        ctx.ring, ctx.block_size = ring, block_size
        device_type = image.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        return row_ce(*state_i), row_ce(*state_t)

    @staticmethod
    def backward(ctx: Any, grad_ce_image: torch.Tensor, grad_ce_text: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        device_type, enabled, dtype = ctx.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            return RingCLIP._backward(ctx, grad_ce_image, grad_ce_text)

    @staticmethod
    def _backward(ctx: Any, grad_ce_image: torch.Tensor, grad_ce_text: torch.Tensor) -> tuple[Any, ...]:
        image, text, scale, max_i, sum_i, max_t, sum_t = ctx.saved_tensors
        ring, block_size = ctx.ring, ctx.block_size
        b, d = image.shape
        acc = _acc_dtype(image)
        img_s, txt_s = image * scale, text * scale
        g_i = torch.zeros(b, dtype=acc, device=image.device) if grad_ce_image is None else grad_ce_image.to(acc)
        g_t = torch.zeros(b, dtype=acc, device=image.device) if grad_ce_text is None else grad_ce_text.to(acc)
        row_grad_i = torch.zeros((b, d), dtype=acc, device=image.device)  # dL/d(s image), own rows
        row_grad_t = torch.zeros((b, d), dtype=acc, device=image.device)  # dL/d(s text), own rows
        block = torch.cat([image, text], dim=1)
        col_grad = torch.zeros((b, 2 * d), dtype=acc, device=image.device)  # travels with `block`
        for k in range(ring.world):
            src = (ring.rank - k) % ring.world
            pending = None
            if k + 1 < ring.world:  # prefetch the next features; this block's gradients go after
                pending = ring.start_shift(block, ring.sizes[(src - 1) % ring.world], FEATURES_TAG)
            positives = 0 if k == 0 else None
            # image rows vs this block's texts: columns' gradient lands in the text half
            backprop_columns(img_s, block[:, d:], max_i, sum_i, g_i, positives, block_size, row_grad_i,
                             col_grad[:, d:], accumulate_c=True)
            backprop_columns(txt_s, block[:, :d], max_t, sum_t, g_t, positives, block_size, row_grad_t,
                             col_grad[:, :d], accumulate_c=True)
            # W hops in all: the last one brings every block's gradient home to its owner
            col_grad = ring.finish_shift(ring.start_shift(col_grad, ring.sizes[(src - 1) % ring.world], GRADS_TAG))
            if pending is not None:
                block = ring.finish_shift(pending)
        need_i, need_t, need_s = ctx.needs_input_grad[:3]
        s = scale.to(acc)
        grad_s = (torch.dot(image.to(acc).reshape(-1), row_grad_i.reshape(-1))
                  + torch.dot(text.to(acc).reshape(-1), row_grad_t.reshape(-1))) if need_s else None
        grad_image = row_grad_i.mul_(s).add_(col_grad[:, :d]).to(image.dtype) if need_i else None
        grad_text = row_grad_t.mul_(s).add_(col_grad[:, d:]).to(text.dtype) if need_t else None
        return grad_image, grad_text, grad_s.to(scale.dtype) if need_s else None, None, None


def ring_local_sum(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, ring: Ring,
                   block_size: int | None = None) -> torch.Tensor:
    """Sum over this rank's rows of (CE_img + CE_txt) / 2 by ring exchange (benchmarks pass a
    simulated `ring`)."""
    if block_size is None:
        block_size = auto_block_size(image.shape[0], max(ring.sizes))
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size}")
    ce_image, ce_text = RingCLIP.apply(image, text, scale, ring, block_size)
    return (ce_image.sum() + ce_text.sum()) / 2


class _SingleRing:
    """The one-rank ring (no process group): a block never leaves."""

    def __init__(self, rows: int) -> None:
        self.rank, self.world, self.sizes = 0, 1, [rows]

    def start_shift(self, tensor: torch.Tensor, recv_rows: int, tag: int) -> Any:
        return tensor

    def finish_shift(self, handle: Any) -> torch.Tensor:
        return handle


def clip_loss_ring(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    block_size: int | None = None,
) -> torch.Tensor:
    """Same value, gradients and conventions as `clip_loss`, without ever holding the
    gathered batch (see module doc). `block_size`: columns per logit block; None picks
    `auto_block_size` (blocks of about 2^23 logits)."""
    check_features(image_features, text_features)
    scale = as_scalar(logit_scale, image_features, "logit_scale")
    _, world = world_info()
    rows = image_features.shape[0]
    ring: Ring = _SingleRing(rows) if world == 1 else ProcessGroupRing(rows, image_features.device)
    total = sum(ring.sizes)
    if total == 0:
        raise ValueError("clip_loss_ring: every rank passed an empty batch (global batch is 0)")
    return rank_share(ring_local_sum(image_features, text_features, scale, ring, block_size), world, total)
