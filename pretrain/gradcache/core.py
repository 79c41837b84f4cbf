"""Exact gradient caching (GradCache, Gao et al. 2021; BASIC, Pham et al. 2021), independent
of how the model is wrapped (plain module: plain.py; DeepSpeed engine: engine.py).

One rank's share of the global batch is cut into chunks; then
  1. `embed_chunks`: every chunk's forward runs WITHOUT gradients (activations freed at
     once); the L2-normalised features and the logit scale are kept (n x d floats);
  2. `feature_grads`: the contrastive loss runs over the rank's whole share against every
     rank's features (the project's losses all-gather with gradient), and autograd gives
     d loss / d features for every local row and d loss / d logit_scale;
  3. `replay_backward`: each chunk's forward runs again WITH gradients (same RNG state, same
     inputs: replay.py) and the cached feature gradients are backpropagated through it, as
     the surrogate scalar  sum(f_img * g_img) + sum(f_txt * g_txt) [+ s * g_s]  whose
     gradient with respect to the chunk's outputs is exactly (g_img, g_txt, g_s).
By the chain rule, the sum over chunks of these backward passes is the gradient of the loss
over the whole share: every sample sees all global negatives (unlike gradient accumulation,
whose micro-batches only see their own), and the peak activation memory is one chunk's.
The logit-scale gradient enters once, through the first chunk; the other chunks add
s * 0, so that every parameter takes part in every backward pass (ZeRO's reducers then see
the same parameter set in each micro-step, as in uncached training).

Run the tests: `.venv/bin/python -m pytest -q tests/test_gradcache.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pretrain.gradcache.replay import RngState, preserved_buffers

# (images, tokens) of one chunk -> (image_features, text_features, logit_scale), as CLIP.forward.
Forward = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# (surrogate scalar, chunk index) -> None: backpropagates the surrogate (plain or through an engine).
Backward = Callable[[torch.Tensor, int], None]
# (image_features, text_features, logit_scale) -> scalar loss (pretrain.loss.get_loss(...)).
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Chunk:
    images: torch.Tensor  # [c, 3, S, S]
    tokens: torch.Tensor  # [c, ctx]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def split_batch(images: torch.Tensor, tokens: torch.Tensor, chunk: int) -> list[Chunk]:
    """Consecutive chunks of at most `chunk` samples (the last may be smaller)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 (got {chunk})")
    if images.shape[0] != tokens.shape[0]:
        raise ValueError(f"images ({images.shape[0]}) and tokens ({tokens.shape[0]}) must have the same batch size")
    if images.shape[0] == 0:
        raise ValueError("gradient caching needs a non-empty local batch")
    return [Chunk(i, t) for i, t in zip(images.split(chunk), tokens.split(chunk))]


@dataclass
class FeatureCache:
    """Pass 1's output: fp32 features of the whole local share, in chunk order."""

    image: torch.Tensor  # [n, d]
    text: torch.Tensor  # [n, d]
    logit_scale: torch.Tensor  # 0-dim, exp(t) as the model returned it
    sizes: list[int]  # rows per chunk
    rng: list[RngState]  # generator state before each chunk's forward
    rng_after: RngState  # generator state after the last chunk's forward


@dataclass
class FeatureGrads:
    loss: torch.Tensor  # 0-dim, detached: this rank's loss (pretrain.loss convention)
    image: torch.Tensor  # [n, d] d loss / d image features
    text: torch.Tensor  # [n, d]
    logit_scale: torch.Tensor  # 0-dim d loss / d exp(t)


def embed_chunks(forward: Forward, chunks: Sequence[Chunk], device: torch.device | str) -> FeatureCache:
    """Pass 1: every chunk's forward without gradients (model left in its current mode)."""
    if not chunks:
        raise ValueError("gradient caching needs at least one chunk")
    images, texts, states = [], [], []
    scale = None
    with torch.no_grad():
        for chunk in chunks:
            states.append(RngState.capture(device))
            img, txt, scale = forward(chunk.images, chunk.tokens)
            # The loss runs in fp32 whatever the model's precision (as the uncached step).
            images.append(img.float())
            texts.append(txt.float())
    assert scale is not None
    return FeatureCache(image=torch.cat(images), text=torch.cat(texts), logit_scale=scale.detach().float().reshape(()),
                        sizes=[len(c) for c in chunks], rng=states, rng_after=RngState.capture(device))


def feature_grads(cache: FeatureCache, loss_fn: LossFn) -> FeatureGrads:
    """Step 2: the loss over the whole local share (and, inside a process group, every
    rank's share as negatives), and its gradients w.r.t. the cached features and the scale.
    Collective: every rank must call it (the loss all-gathers, its backward reduces)."""
    image = cache.image.detach().requires_grad_(True)
    text = cache.text.detach().requires_grad_(True)
    scale = cache.logit_scale.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(image, text, scale)
        if loss.dim() != 0:
            raise ValueError(f"the loss must be a scalar; got shape {tuple(loss.shape)}")
        g_image, g_text, g_scale = torch.autograd.grad(loss, (image, text, scale), allow_unused=True)
    # An unused input (e.g. a loss without temperature) has a zero gradient, not None.
    g_image = torch.zeros_like(image) if g_image is None else g_image
    g_text = torch.zeros_like(text) if g_text is None else g_text
    g_scale = torch.zeros_like(scale) if g_scale is None else g_scale
    return FeatureGrads(loss=loss.detach(), image=g_image, text=g_text, logit_scale=g_scale)


def surrogate(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              g_image: torch.Tensor, g_text: torch.Tensor, g_scale: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient w.r.t. the three outputs is exactly (g_image, g_text, g_scale):
    the backward of `sum(x * g)` hands `g` (times the incoming 1.0) to `x` unchanged."""
    return ((image_features.float() * g_image).sum() + (text_features.float() * g_text).sum()
            + (logit_scale.float().reshape(()) * g_scale))


def replay_backward(forward: Forward, chunks: Sequence[Chunk], cache: FeatureCache, grads: FeatureGrads,
                    backward: Backward, module: nn.Module) -> float:
    """Pass 2: re-run each chunk with gradients and call `backward(surrogate, k)`.

    `module` is the model whose buffers pass 2 must not change (replay.py). Returns the
    largest absolute difference between pass-2 and pass-1 features: 0 on deterministic
    kernels (CPU); a large value means the model's forward is not a function of its inputs
    and RNG state (the gradients would then be those of a different computation).
    """
    if [len(c) for c in chunks] != cache.sizes:
        raise ValueError(f"chunks of sizes {[len(c) for c in chunks]} do not match the cached {cache.sizes}")
    start = 0
    zero = torch.zeros_like(grads.logit_scale)
    worst = torch.zeros((), dtype=cache.image.dtype, device=cache.image.device)  # on device: no sync per chunk
    with preserved_buffers(module):
        try:
            for k, chunk in enumerate(chunks):
                stop = start + len(chunk)
                cache.rng[k].restore()
                img, txt, scale = forward(chunk.images, chunk.tokens)
                with torch.no_grad():
                    worst = torch.maximum(worst, (img.float() - cache.image[start:stop]).abs().max())
                    worst = torch.maximum(worst, (txt.float() - cache.text[start:stop]).abs().max())
                g_scale = grads.logit_scale if k == 0 else zero
                loss = surrogate(img, txt, scale, grads.image[start:stop], grads.text[start:stop], g_scale)
                del img, txt, scale  # the graph holds what backward needs
                backward(loss, k)
                start = stop
        finally:
            cache.rng_after.restore()
    return float(worst)
