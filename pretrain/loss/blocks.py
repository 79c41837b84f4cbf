"""Block folds shared by the memory-efficient CLIP losses (tiled.py, ring.py).

Both losses walk the logits z = (s A) @ C^T one b x block_size block at a time and keep a
streaming log-sum-exp per row: (running max, running sum of exp, positive logit), folded
block by block and turned into the row's cross-entropy at the end (`row_ce`). This module
holds the pieces both walk with: the default block size, where the positives fall inside a
block, the accumulation dtype and an in-place matmul. No collectives, no autograd.

Run the tests: `.venv/bin/python -m pytest -q tests/test_loss_tiled.py tests/test_loss_ring.py`.
"""

from __future__ import annotations

import torch

BLOCK_ELEMENTS = 1 << 23  # default block budget: b x block_size ~ 8M logits (32 MiB fp32)
MIN_BLOCK_SIZE = 256  # below this the per-block matmuls get too thin to run fast


def auto_block_size(local_rows: int, global_rows: int) -> int:
    """Columns per block so that a block holds about BLOCK_ELEMENTS logits."""
    return max(1, min(global_rows, max(MIN_BLOCK_SIZE, BLOCK_ELEMENTS // max(local_rows, 1))))


def positives_in_block(
    b: int, offset: int, start: int, stop: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns within the block) of the positive pairs that fall in columns
    [start, stop): row i's positive is global column offset + i."""
    lo, hi = max(start - offset, 0), min(stop - offset, b)
    rows = torch.arange(lo, max(hi, lo), device=device)
    return rows, rows + (offset - start)


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulate in fp32 even for bf16/fp16 features (the exp-sums are the sensitive part),
    in fp64 for fp64 features."""
    return torch.promote_types(x.dtype, torch.float32)


def matmul_into(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, accumulate: bool) -> None:
    """out (+)= x @ y without a temporary where possible (a k x d temporary at k = B is as big
    as the gathered features). Under autocast, or across dtypes, fall back to the
    out-of-place product so that autocast still picks the matmul precision."""
    if out.dtype == x.dtype == y.dtype and not torch.is_autocast_enabled(out.device.type):
        if accumulate:
            out.addmm_(x, y)
        else:
            torch.mm(x, y, out=out)
    elif accumulate:
        out += x @ y
    else:
        out.copy_(x @ y)


def new_row_state(b: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(running max, running sum of exp, positive logit) of b rows, before any column."""
    return (torch.full((b,), float("-inf"), device=device, dtype=dtype),
            torch.zeros((b,), device=device, dtype=dtype), torch.zeros((b,), device=device, dtype=dtype))


def row_ce(row_max: torch.Tensor, row_sum: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy from the streaming state: lse - positive."""
    return (row_max - positive) + torch.log(row_sum)
