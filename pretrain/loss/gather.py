"""All-gather of per-rank features with gradient: the only code of the loss that talks to collectives.

`gather_features(x)` returns `(all_x, offset)`: the rows of every rank concatenated in rank
order, and the index of this rank's first row in that global batch. Outside a process group
(or at world size 1) it is a no-op returning `(x, 0)`.

Gradient: `torch.distributed.nn.functional.all_gather` is differentiable and its backward
SUMS the gradients that every rank computed for a slice and hands the sum to the slice's
owner. A loss written over local rows only (see clip.py) therefore gives each rank the
gradient of the sum of all ranks' losses with respect to its own features.

Unequal local batch sizes (e.g. a last partial batch) are supported: the local row counts are
all-gathered first (one tiny extra collective), every rank pads to the largest count, the
padded rows are gathered and then dropped. Padding rows get zero gradient. A rank may even
hold zero rows; the global batch must not be empty.

Run the tests: `.venv/bin/python -m pytest -q tests/test_loss_dist.py`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def world_info() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_sizes(n: int, device: torch.device, group: Any = None) -> list[int]:
    """Local row counts of every rank of `group` (default: the default process group), in
    rank order (`[n]` outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [n]
    # NCCL only moves CUDA tensors, gloo only CPU ones: use the features' own device.
    local = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, local, group=group)
    return [int(s.item()) for s in sizes]


def gather_features(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather `x` ([b, ...], b may differ per rank) with gradient.

    Returns `(all_x, offset)` with `all_x` = cat of every rank's rows ([B, ...], B = sum of
    the b's) and `all_x[offset:offset + b]` equal to this rank's `x`.
    """
    rank, world = world_info()
    if world == 1:
        return x, 0
    sizes = gather_sizes(x.shape[0], x.device)
    total = sum(sizes)
    if total == 0:
        raise ValueError("gather_features: every rank passed an empty batch (global batch is 0)")
    offset = sum(sizes[:rank])
    biggest = max(sizes)
    if biggest != x.shape[0]:
        # Pad this rank's rows up to the largest count so all_gather sees equal shapes;
        # cat is differentiable, so the real rows keep their gradient.
        pad = x.new_zeros((biggest - x.shape[0],) + tuple(x.shape[1:]))
        x = torch.cat([x, pad], dim=0)
    with warnings.catch_warnings():
        # Recent torch marks this differentiable all_gather deprecated in favour of the private
        # torch.distributed._functional_collectives; it is still the public, tested path.
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*", category=FutureWarning)
        parts = dist_fn.all_gather(x.contiguous())
    parts = [p[:n] for p, n in zip(parts, sizes)]
    return torch.cat(parts, dim=0), offset


def gather_pair(
    image_features: torch.Tensor, text_features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Gather image and text features in ONE collective (concatenated along the feature
    dim, then split again): `(all_image, all_text, offset)`."""
    d = image_features.shape[1]
    both, offset = gather_features(torch.cat([image_features, text_features], dim=1))
    # split (not two slices): its backward concatenates the two gradients once, where each
    # slice's backward would allocate a zero-filled B x 2d buffer of its own
    all_image, all_text = torch.split(both, [d, text_features.shape[1]], dim=1)
    return all_image, all_text, offset


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """`value` (a count, no gradient) summed over the ranks of the default process group;
    `value` itself outside one. The per-token and per-caption losses (captioning.py, bow.py)
    normalise by it, so that averaging the ranks' losses gives the global-batch mean."""
    value = value.detach().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
    return value
