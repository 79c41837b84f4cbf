"""Gradient caching on a plain `nn.Module` (no DeepSpeed): accumulates into `param.grad`.

    from pretrain.gradcache import gradcache_backward
    loss = gradcache_backward(model, images, tokens, get_loss("clip"), chunk=256)
    optimizer.step()

Outside a process group the result equals `loss_fn(*model(images, tokens)).backward()` on
the whole batch. Inside one (gloo/NCCL, no DDP wrapper), each rank gets the gradient of its
loss with every rank's features as negatives; averaging the ranks' `param.grad` (what DDP
or DeepSpeed do) gives the single-process full-global-batch gradient (pretrain.loss
convention). Under DDP, wrap every chunk but the last in `no_sync()` yourself, or use the
DeepSpeed path (engine.py).

Run the tests: `.venv/bin/python -m pytest -q tests/test_gradcache.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.gradcache.core import LossFn, embed_chunks, feature_grads, replay_backward, split_batch


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def gradcache_backward(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, loss_fn: LossFn,
                       chunk: int) -> torch.Tensor:
    """Backpropagate `loss_fn` over the whole batch with at most `chunk` samples' activations
    alive at a time; gradients are ADDED to `param.grad` (zero them first, as for
    `loss.backward()`). Returns the detached loss."""
    device = _device_of(model)
    chunks = split_batch(images, tokens, chunk)

    def forward(imgs: torch.Tensor, toks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return model(imgs.to(device, non_blocking=True), toks.to(device, non_blocking=True))

    cache = embed_chunks(forward, chunks, device)
    grads = feature_grads(cache, loss_fn)
    replay_backward(forward, chunks, cache, grads, lambda surrogate, _k: surrogate.backward(), model)
    return grads.loss
