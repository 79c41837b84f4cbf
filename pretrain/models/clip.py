"""The two-tower CLIP model: an image tower (``visual``: ModifiedResNet or ViT), the
causal text tower (top-level parameters, OpenAI layout), linear projections into a shared
space and a learnable temperature.

``forward(images, tokens)`` returns ``(image_features, text_features, logit_scale)`` with
L2-normalised features and ``logit_scale`` already exponentiated (0-dim); a model built
with ``init_logit_bias`` (SigLIP) also has a learnable ``logit_bias`` [1], returned 4th. The parameter
``logit_scale`` has shape [1]: a 0-dim parameter breaks ``deepspeed.initialize`` with more
than one rank (the OpenAI layout's 0-dim tensor is produced by ``to_openai_state_dict``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configs import CLIPConfig, ResNetConfig
from .resnet import ModifiedResNet
from .text import TextTowerMixin
from .vit import VisionTransformer

LOGIT_SCALE_INIT = math.log(1 / 0.07)


def build_visual(cfg: CLIPConfig) -> nn.Module:
    v = cfg.vision
    if isinstance(v, ResNetConfig):
        return ModifiedResNet(layers=v.layers, output_dim=cfg.embed_dim, heads=v.heads,
                              input_resolution=cfg.image_size, width=v.width)
    return VisionTransformer(input_resolution=cfg.image_size, patch_size=v.patch_size,
                             width=v.width, layers=v.layers, heads=v.heads,
                             output_dim=cfg.embed_dim, act=cfg.act)


class CLIP(TextTowerMixin, nn.Module):
    objective = "contrastive"  # a class attribute: no state-dict key

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = build_visual(config)
        t = config.text
        self._init_text_tower(t.context_length, t.vocab_size, t.width, t.layers, t.heads,
                              config.embed_dim, config.act)
        self.logit_scale = nn.Parameter(torch.full((1,), float(config.init_logit_scale)))
        # SigLIP's learnable bias, only when the config asks for it (CLIP models have none)
        self.logit_bias: nn.Parameter | None = None
        if config.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.full((1,), float(config.init_logit_bias)))
        if config.grad_checkpointing:
            self.set_grad_checkpointing(True)

    # --- the attributes other parts of the project read --------------------------------
    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def context_length(self) -> int:
        return self.config.text.context_length

    @property
    def vocab_size(self) -> int:
        return self.config.text.vocab_size

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def set_grad_checkpointing(self, enabled: bool = True, image: bool = True,
                               text: bool = True) -> None:
        """Switch non-reentrant activation checkpointing (per residual block / ResNet
        stage) for the selected towers; the other tower keeps its setting."""
        if image:
            self.visual.grad_checkpointing = enabled
        if text:
            self.transformer.grad_checkpointing = enabled

    # --- encoders ------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised projected image features, (B, embed_dim), from (B, 3, S, S)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (batch, 3, {self.image_size}, {self.image_size}),"
                             f" got shape {tuple(images.shape)}")
        return self.visual(images)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(image_features, text_features, logit_scale)``, plus ``logit_bias`` (0-dim) as a
        4th output when the model has one: under ZeRO-3 a parameter is only gathered inside
        the forward, so the loss gets the bias from here rather than from the attribute."""
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        scale = self.logit_scale.exp().squeeze(0)
        if self.logit_bias is None:
            return image_features, text_features, scale
        return image_features, text_features, scale, self.logit_bias.squeeze(0)
