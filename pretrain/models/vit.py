"""CLIP's Vision Transformer image tower (arXiv 2103.00020; docs/models.md).

conv patchify (no bias) -> [class token; patches] + learned positional embedding ->
[training only, optional: FLIP patch dropout] -> ln_pre -> pre-norm transformer -> ln_post on the class token -> ``@ proj``.
Keys match OpenAI's layout under ``visual.``.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import LayerNorm, Transformer, init_scale
from .patch_dropout import drop_patches, kept_patches


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int,
                 heads: int, output_dim: int, act: str = "quick_gelu") -> None:
        super().__init__()
        if input_resolution % patch_size != 0:
            raise ValueError(f"image size {input_resolution} is not a multiple of the "
                             f"patch size {patch_size}")
        self.input_resolution, self.patch_size, self.output_dim = input_resolution, patch_size, output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        grid = input_resolution // patch_size
        scale = init_scale(width)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, act=act)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self._patch_dropout = 0.0  # FLIP rate (model.patch_dropout), training only

    @property
    def patch_dropout(self) -> float:
        return self._patch_dropout

    @patch_dropout.setter
    def patch_dropout(self, rate: float) -> None:
        kept_patches(1, rate)  # validates the rate
        self._patch_dropout = float(rate)

    @property
    def grad_checkpointing(self) -> bool:
        return self.transformer.grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, enabled: bool) -> None:
        self.transformer.grad_checkpointing = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_post(self.token_states(x)[:, 0]) @ self.proj  # (B, output_dim)

    def image_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Every token (class token first) through ln_post and ``@ proj``, (B, 1 + g*g,
        output_dim): what a text decoder attends to (pretrain/models/captioning.py)."""
        return self.ln_post(self.token_states(x)) @ self.proj

    def token_states(self, x: torch.Tensor) -> torch.Tensor:
        """The transformer's output for every token, (B, 1 + g*g, W) (fewer patches under
        patch dropout in training)."""
        if x.shape[-2:] != (self.input_resolution, self.input_resolution):
            raise ValueError(f"expected {self.input_resolution}px images, got "
                             f"{tuple(x.shape[-2:])}")
        x = self.conv1(x.to(self.conv1.weight.dtype))  # (B, W, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, g*g+1, W)
        if self.training and self._patch_dropout:
            x = drop_patches(x, self._patch_dropout)  # after the positions are added (FLIP)
        return self.transformer(self.ln_pre(x))
