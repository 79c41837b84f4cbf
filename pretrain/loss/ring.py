"""Ring-exchange form of the distributed CLIP loss: no rank holds the gathered batch, and
every logit of the global B x B matrix is computed once instead of twice.

The all-gather losses (clip.py, tiled.py) hold every rank's features and their gradients,
2 x B x d per tower, and each rank computes its b x B image->text logits AND its b x B
text->image logits: in the global matrix Z = s I T^T that is its row stripe and its column
stripe, so every off-diagonal logit is computed by two ranks. Here the text blocks travel
around a ring (the exchange of Inf-CL, arXiv 2410.17243) and rank r computes only its row
stripe, tile by tile: at step k it holds rank r - k's texts, computes Z[r, r - k], folds
it into the streaming log-sum-exp of its own image rows, and also into the column
statistics (max, sum of exp, positive) of those texts, which travel with them and arrive
back at their owner after W hops: the text->image cross-entropy of its texts. The backward
runs the ring again: each tile gives D = g_row (softmax_row - 1) + g_col (softmax_col - 1),
the image gradient D T stays local, and the text gradient D^T I is added to an accumulator
that travels with the text block and comes home with the contributions of every rank.

Cost per rank: 4 matmuls of b x b x d per step (forward 1, backward 3), i.e. 4 b B d in
all, against 6 b B d for the all-gather losses with materialised logits (2 logit matrices
and 4 gradient products) and 8 b B d for tiled.py (which also recomputes). Memory: its own
b x d features and gradients, two text blocks in flight with a gradient accumulator, and
the logit blocks: O(b x d + b x block_size), independent of W and B. Traffic: W - 1 hops of
b x d texts forward and backward, W hops of the b x d text gradients and of 3 b column
statistics; the forward's feature hop is overlapped with the matmuls.

Values and gradients equal `clip_loss` (fp32, 1e-5) under the same conventions (clip.py):
rank r returns `world / B * sum of its rows' (CE_img + CE_txt) / 2`, and the gradient of its
own features is that of the sum of all ranks' losses. The logit-scale gradient of one rank
differs from the all-gather form's (it covers rank r's tiles, not rank r's loss), but their
mean over ranks, which DDP and DeepSpeed apply, is the same. Unequal local batch sizes are
supported (one extra all-gather of the sizes). Every rank must call the forward and the
backward (as with any collective).

Run the tests: `.venv/bin/python -m pytest -q tests/test_loss_ring.py`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist

from pretrain.loss.common import as_scalar, check_features, rank_share
from pretrain.loss.gather import gather_sizes, world_info
from pretrain.loss.blocks import acc_dtype, auto_block_size, matmul_into, new_row_state, positives_in_block, row_ce

# Separate tags: messages of one block may cross (texts are prefetched, statistics and
# gradients follow the compute).
FEATURES_TAG, GRADS_TAG, STATS_TAG, META_TAG = 17, 18, 19, 20


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
        self.sizes = gather_sizes(local_rows, device, group)

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


def _fold_tile(img_s: torch.Tensor, txt: torch.Tensor, rows: tuple[torch.Tensor, ...],
               cols: tuple[torch.Tensor, ...], own: bool, block_size: int) -> None:
    """Fold the tile Z = img_s @ txt^T into the streaming statistics of its rows (this rank's
    images) and of its columns (the texts), in place, one b x block_size block at a time.
    `own`: the texts are this rank's, so the diagonal holds the positives."""
    b = img_s.shape[0]
    r_max, r_sum, r_pos = rows
    c_max, c_sum, c_pos = cols
    if b == 0:  # a rank without rows adds nothing to the columns
        return
    for start in range(0, txt.shape[0], block_size):
        stop = min(start + block_size, txt.shape[0])
        z = (img_s @ txt[start:stop].T).to(r_sum.dtype)  # (b, k)
        if own:
            i, j = positives_in_block(b, 0, start, stop, img_s.device)
            r_pos[i] = z[i, j]
            c_pos[start + j] = z[i, j]
        cm = c_max[start:stop]
        new_cm = torch.maximum(cm, z.amax(dim=0))
        col_exp = torch.exp(z - new_cm[None, :])
        c_sum[start:stop].mul_(torch.exp(cm - new_cm)).add_(col_exp.sum(dim=0))
        cm.copy_(new_cm)
        del col_exp
        new_rm = torch.maximum(r_max, z.amax(dim=1))
        r_sum.mul_(torch.exp(r_max - new_rm)).add_(z.sub_(new_rm[:, None]).exp_().sum(dim=1))
        r_max.copy_(new_rm)
        del z


def _backprop_tile(img_s: torch.Tensor, txt: torch.Tensor, row: tuple[torch.Tensor, ...],
                   col: tuple[torch.Tensor, ...], own: bool, block_size: int, grad_img: torch.Tensor,
                   grad_txt: torch.Tensor) -> None:
    """Backward of `_fold_tile`. `row` / `col`: (max, sum, loss gradient) of the rows and of
    the columns. Per block D = g_row (softmax_row - onehot) + g_col (softmax_col - onehot);
    adds D @ txt to `grad_img` (= dL/d img_s) and D^T @ img_s to `grad_txt`."""
    r_max, r_sum, g_row = row
    c_max, c_sum, g_col = col
    b = img_s.shape[0]
    if b == 0:
        return
    # softmax as exp(z - max) / sum, never exp(z - lse) (tiled.py says why)
    row_w = (g_row / r_sum)[:, None]
    for start in range(0, txt.shape[0], block_size):
        stop = min(start + block_size, txt.shape[0])
        t_blk = txt[start:stop]
        z = (img_s @ t_blk.T).to(grad_img.dtype)
        d_col = torch.exp(z - c_max[None, start:stop]).mul_((g_col[start:stop] / c_sum[start:stop])[None, :])
        dz = z.sub_(r_max[:, None]).exp_().mul_(row_w).add_(d_col)
        del d_col
        if own:
            i, j = positives_in_block(b, 0, start, stop, img_s.device)
            dz[i, j] -= g_row[i] + g_col[start + j]
        dz = dz.to(img_s.dtype)
        matmul_into(grad_img, dz, t_blk, accumulate=True)
        matmul_into(grad_txt[start:stop], dz.T, img_s, accumulate=True)
        del dz


class RingCLIP(torch.autograd.Function):
    """(ce_image, ce_text) of this rank's rows, by the ring (module doc)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, ring: Ring, block_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = image.shape[0]
        acc = acc_dtype(image)
        img_s = image * scale
        rows = new_row_state(b, image.device, acc)
        block = text  # the texts held at this step; their column statistics travel with them
        cols = torch.stack(new_row_state(b, image.device, acc), dim=1)  # (rows of block, 3)
        for k in range(ring.world):
            src = (ring.rank - k) % ring.world
            nxt = ring.sizes[(src - 1) % ring.world]
            pending = ring.start_shift(block, nxt, FEATURES_TAG) if k + 1 < ring.world else None
            c_max, c_sum, c_pos = (cols[:, 0].clone(), cols[:, 1].clone(), cols[:, 2].clone())
            _fold_tile(img_s, block, rows, (c_max, c_sum, c_pos), k == 0, block_size)
            # W hops: after the last one every block's statistics are home
            cols = ring.finish_shift(ring.start_shift(torch.stack([c_max, c_sum, c_pos], dim=1), nxt, STATS_TAG))
            if pending is not None:
                block = ring.finish_shift(pending)
        t_max, t_sum, t_pos = cols[:, 0].contiguous(), cols[:, 1].contiguous(), cols[:, 2].contiguous()
        ctx.save_for_backward(image, text, scale, rows[0], rows[1], t_max, t_sum)
        ctx.ring, ctx.block_size = ring, block_size
        device_type = image.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        return row_ce(*rows), row_ce(t_max, t_sum, t_pos)

    @staticmethod
    def backward(ctx: Any, grad_ce_image: torch.Tensor, grad_ce_text: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        device_type, enabled, dtype = ctx.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            return RingCLIP._backward(ctx, grad_ce_image, grad_ce_text)

    @staticmethod
    def _backward(ctx: Any, grad_ce_image: torch.Tensor, grad_ce_text: torch.Tensor) -> tuple[Any, ...]:
        image, text, scale, r_max, r_sum, t_max, t_sum = ctx.saved_tensors
        ring, block_size = ctx.ring, ctx.block_size
        b, d = image.shape
        acc = acc_dtype(image)
        img_s = image * scale
        zeros = torch.zeros(b, dtype=acc, device=image.device)
        g_row = zeros if grad_ce_image is None else grad_ce_image.to(acc)
        g_col = zeros if grad_ce_text is None else grad_ce_text.to(acc)
        grad_img = torch.zeros((b, d), dtype=acc, device=image.device)  # dL/d(s image)
        block = text
        meta = torch.stack([t_max, t_sum, g_col], dim=1)  # what the block's columns need
        grad_txt = torch.zeros((b, text.shape[1]), dtype=acc, device=image.device)  # travels
        for k in range(ring.world):
            src = (ring.rank - k) % ring.world
            nxt = ring.sizes[(src - 1) % ring.world]
            pending = None
            if k + 1 < ring.world:  # the next texts and their statistics, while this tile runs
                pending = (ring.start_shift(block, nxt, FEATURES_TAG), ring.start_shift(meta, nxt, META_TAG))
            _backprop_tile(img_s, block, (r_max, r_sum, g_row), (meta[:, 0], meta[:, 1], meta[:, 2]), k == 0,
                           block_size, grad_img, grad_txt)
            # W hops: the last one brings every text block's gradient home to its owner
            grad_txt = ring.finish_shift(ring.start_shift(grad_txt, nxt, GRADS_TAG))
            if pending is not None:
                block, meta = ring.finish_shift(pending[0]), ring.finish_shift(pending[1])
        need_i, need_t, need_s = ctx.needs_input_grad[:3]
        # z = (s I) T^T: dL/dI = s dL/d(sI); dL/ds = sum(I * dL/d(sI)) over this rank's tiles
        grad_s = torch.dot(image.to(acc).reshape(-1), grad_img.reshape(-1)) if need_s else None
        return (grad_img.mul_(scale.to(acc)).to(image.dtype) if need_i else None,
                grad_txt.to(text.dtype) if need_t else None,
                grad_s.to(scale.dtype) if need_s else None, None, None)


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
