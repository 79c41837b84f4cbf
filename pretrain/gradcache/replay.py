"""What makes gradient caching's second forward the SAME computation as its first.

Gradient caching runs every chunk's forward twice: once without gradients (pass 1, the
real forward) and once with gradients (pass 2, a recomputation for backpropagation). Two
kinds of state could make the two runs differ or leave the model in a different state
than one ordinary forward per chunk would:

- random numbers (dropout, stochastic depth, any torch RNG use inside the model): the
  generator state before each chunk's pass-1 forward is recorded (`RngState.capture`) and
  put back before that chunk's pass-2 forward; after pass 2 the state reached at the end
  of pass 1 is put back, so the rest of training draws the same numbers as if each chunk
  had run once;
- module buffers updated by the forward (BatchNorm's running mean/var and
  num_batches_tracked, in train mode): pass 1 updates them once per chunk, exactly as
  uncached micro-batches would; `preserved_buffers` snapshots every buffer after pass 1 and
  restores it after pass 2, undoing the recomputation's second update (including the one
  of gradient checkpointing's own recomputation in the backward). In train mode BatchNorm
  normalises with the chunk's batch statistics, never the running ones, so pass-2 outputs
  do not depend on what pass 1 did to the buffers.

Data augmentation is not the model's business: the loader applies it once per sample and
both passes see the same tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class RngState:
    """The CPU generator state and, for a CUDA device, that device's generator state."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    device: torch.device

    @staticmethod
    def capture(device: torch.device | str) -> "RngState":
        device = torch.device(device)
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return RngState(torch.get_rng_state(), cuda, device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


@contextmanager
def preserved_buffers(module: nn.Module) -> Iterator[None]:
    """Every buffer of `module` is put back to its value at entry when the block exits
    (normally or by an exception). Buffers are small next to activations (BatchNorm: 2 x C
    per layer), so a full snapshot costs little and covers any stateful layer."""
    saved = [(owner, name, buf.detach().clone())
             for owner in module.modules() for name, buf in owner.named_buffers(recurse=False)
             if buf is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for owner, name, value in saved:
                current = getattr(owner, name)
                if torch.is_tensor(current) and current.shape == value.shape and current.dtype == value.dtype:
                    current.copy_(value)
                else:  # the forward replaced the buffer object: put the old value back whole
                    setattr(owner, name, value)
