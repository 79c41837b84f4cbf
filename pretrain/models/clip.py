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

from .configs import CLIPConfig
from .image_model import ImageTowerModel
from .text import TextTowerMixin

LOGIT_SCALE_INIT = math.log(1 / 0.07)


class CLIP(TextTowerMixin, ImageTowerModel):
    objective = "contrastive"  # a class attribute: no state-dict key

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__(config)  # ImageTowerModel: config, visual, the shared attributes
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

    def set_grad_checkpointing(self, enabled: bool = True, image: bool = True,
                               text: bool = True) -> None:
        """Switch non-reentrant activation checkpointing (per residual block / ResNet
        stage) for the selected towers; the other tower keeps its setting."""
        if image:
            self.visual.grad_checkpointing = enabled
        if text:
            self.transformer.grad_checkpointing = enabled

    # --- encoders ------------------------------------------------------------------------
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
