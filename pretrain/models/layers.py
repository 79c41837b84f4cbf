"""Transformer building blocks shared by the text tower and the ViT image tower.

Parameter names follow OpenAI's released CLIP layout (``attn.in_proj_weight``,
``attn.out_proj``, ``mlp.c_fc``, ``mlp.c_proj``, ``ln_1``, ``ln_2``) so that a state dict
maps one-to-one onto OpenAI / open_clip checkpoints. Attention runs through
``F.scaled_dot_product_attention`` so GPUs get the fused (flash / memory-efficient)
kernels; tensors are batch-first ``(B, L, W)`` (the key layout does not depend on it).

No imports of collectives or of the DeepSpeed engine here: wrapping happens in the trainer.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ACTIVATIONS = ("quick_gelu", "gelu")


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of OpenAI's released CLIP models."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    """``"quick_gelu"`` (OpenAI release) or ``"gelu"`` (exact erf GELU, later open_clip)."""
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, so fp16/bf16 weights or inputs keep
    the statistics exact (the mean/variance of wide rows loses precision in half types).

    An fp32 input with fp32 weights goes straight to ``F.layer_norm`` (no casts). With
    ``fp32 = False`` (run config ``model.ln_fp32: false``) a half-type input is normalised
    in its own dtype: no fp32 copy of the activations (CUDA's kernel still accumulates the
    statistics in fp32, but the output rounds differently from the exact path)."""

    fp32: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        native = x.dtype == torch.float32 or not self.fp32
        if native and (self.weight is None or self.weight.dtype == x.dtype):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        dtype = x.dtype if native else torch.float32
        weight = self.weight.to(dtype) if self.weight is not None else None
        bias = self.bias.to(dtype) if self.bias is not None else None
        y = F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps)
        return y.to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names
    (``in_proj_weight`` [3W, W], ``in_proj_bias`` [3W], ``out_proj``), computed by SDPA."""

    def __init__(self, width: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.width, self.heads, self.causal = width, heads, causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3W)
        qkv = qkv.view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, D)
        # no mask tensor: the vision tower attends fully, the text tower uses is_causal, so
        # SDPA may pick the flash / memory-efficient kernels (a dense mask rules flash out)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        y = y.transpose(1, 2).reshape(b, n, w)  # (B, N, W)
        return self.out_proj(y)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)); x + mlp(ln_2(x)), MLP ratio 4."""

    def __init__(self, width: int, heads: int, act: str = "quick_gelu", causal: bool = False) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal=causal)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", make_activation(act)),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def run_checkpointed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Activation checkpointing, always non-reentrant: the reentrant variant silently
    drops parameter gradients when no input of the block requires grad (docs/models.md)."""
    return checkpoint(fn, x, use_reentrant=False)


class Transformer(nn.Module):
    """A stack of residual attention blocks (``resblocks.{i}``), optionally causal,
    with per-block activation checkpointing when ``grad_checkpointing`` is set."""

    def __init__(self, width: int, layers: int, heads: int, act: str = "quick_gelu",
                 causal: bool = False) -> None:
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, act=act, causal=causal) for _ in range(layers)])
        self.init_parameters()

    def init_parameters(self) -> None:
        """OpenAI's text-transformer init, used for both towers' transformers:
        in_proj std W^-0.5, out_proj and c_proj std W^-0.5 (2L)^-0.5 (residual branches
        shrink with depth), c_fc std (2W)^-0.5; biases zero."""
        attn_std = self.width ** -0.5
        proj_std = self.width ** -0.5 * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            for bias in (block.attn.in_proj_bias, block.attn.out_proj.bias,
                         block.mlp.c_fc.bias, block.mlp.c_proj.bias):
                nn.init.zeros_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.resblocks:
            x = run_checkpointed(block, x) if checkpointing else block(x)
        return x


def init_scale(width: int) -> float:
    """width^-0.5: the std OpenAI uses for embeddings and projections of a width-W tower."""
    return 1.0 / math.sqrt(width)
