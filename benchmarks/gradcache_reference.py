"""An independent reference gradient for global batches whose uncached graph does not fit:
float64, one process, no DeepSpeed, no collectives, and the CLIP loss gradient in closed
form (no autograd through the loss, none of pretrain.loss's code).

For S = s I T^T (B x B, rows: images, columns: texts) the loss of the paper is
    L = 1/(2B) sum_i [lse_j S_ij - S_ii] + 1/(2B) sum_j [lse_i S_ij - S_jj],
so with P = row softmax of S and Q = column softmax of S,
    G = dL/dS = (P + Q - 2 Id) / (2B),  dL/dI = s G T,  dL/dT = s G^T I,  dL/ds = sum(G * S) / s.
`clip_loss_grads` evaluates this in row blocks (two passes: the row and streaming column
log-sum-exps, then G block by block), never holding B x B. `reference_grads` then applies
the chain rule chunk by chunk with autograd (VJP of the float64 model at the loss's feature
gradients), so the whole batch's activations never coexist either.

Used by scripts/gradcache_32k.py; validated against plain full-batch autograd in
tests/test_gradcache.py (which puts benchmarks/ on sys.path and imports it as
`gradcache_reference`). Imports nothing of the project.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

SampleFn = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]  # (start, stop) -> images, tokens


def clip_loss_grads(image: torch.Tensor, text: torch.Tensor, scale: float,
                    block: int = 1024) -> tuple[float, torch.Tensor, torch.Tensor, float]:
    """(loss, dL/dimage, dL/dtext, dL/dscale) of the full-batch CLIP loss, in float64."""
    image, text = image.double(), text.double()
    n = image.shape[0]
    diag = scale * (image * text).sum(1)
    row_lse = torch.empty(n, dtype=torch.float64)
    col_max = torch.full((n,), -torch.inf, dtype=torch.float64)
    col_sum = torch.zeros(n, dtype=torch.float64)
    for r0 in range(0, n, block):
        s = scale * image[r0:r0 + block] @ text.T  # (r, B)
        row_lse[r0:r0 + block] = torch.logsumexp(s, dim=1)
        new_max = torch.maximum(col_max, s.max(dim=0).values)
        col_sum = col_sum * torch.exp(col_max - new_max) + torch.exp(s - new_max).sum(dim=0)
        col_max = new_max
    col_lse = col_max + torch.log(col_sum)
    loss = float(((row_lse - diag).sum() + (col_lse - diag).sum()) / (2 * n))
    g_image, g_text, g_scale = torch.zeros_like(image), torch.zeros_like(text), 0.0
    for r0 in range(0, n, block):
        rows = image[r0:r0 + block]
        s = scale * rows @ text.T
        g = (torch.exp(s - row_lse[r0:r0 + block, None]) + torch.exp(s - col_lse[None, :])) / (2 * n)
        idx = torch.arange(rows.shape[0])
        g[idx, r0 + idx] -= 1.0 / n  # the two positives' one-hots, 2 / (2B)
        g_image[r0:r0 + block] = scale * g @ text
        g_text += scale * g.T @ rows
        g_scale += float((g * s).sum()) / scale
    return loss, g_image, g_text, g_scale


def reference_grads(model: nn.Module, samples: SampleFn, n: int, chunk: int = 1024, block: int = 1024,
                    dtype: torch.dtype = torch.float64) -> tuple[float, dict[str, torch.Tensor]]:
    """(loss, {param name: gradient}) of the CLIP loss over samples 0..n-1 for a copy of
    `model` in `dtype` (float64 by default; train mode, no activation checkpointing); the
    loss gradient is float64 either way. The model must be a deterministic function of its
    inputs (no dropout, no train-mode BatchNorm)."""
    ref = copy.deepcopy(model).to(dtype).train()
    ref.set_grad_checkpointing(False)
    ref.zero_grad(set_to_none=True)
    starts = list(range(0, n, chunk))
    feats_img, feats_txt = [], []
    with torch.no_grad():
        for s0 in starts:
            images, tokens = samples(s0, min(n, s0 + chunk))
            img, txt, log_scale_exp = ref(images.to(dtype), tokens)
            feats_img.append(img)
            feats_txt.append(txt)
    scale = float(log_scale_exp)
    loss, g_img, g_txt, g_scale = clip_loss_grads(torch.cat(feats_img), torch.cat(feats_txt), scale, block)
    del feats_img, feats_txt
    for k, s0 in enumerate(starts):
        s1 = min(n, s0 + chunk)
        images, tokens = samples(s0, s1)
        img, txt, sc = ref(images.to(dtype), tokens)
        outputs, grads = [img, txt], [g_img[s0:s1].to(dtype), g_txt[s0:s1].to(dtype)]
        if k == 0:  # d exp(t) / dt flows through the model's own exp once
            outputs.append(sc)
            grads.append(torch.tensor(g_scale, dtype=dtype))
        torch.autograd.backward(outputs, grads)
    return loss, {name: p.grad.detach().clone() for name, p in ref.named_parameters()}
