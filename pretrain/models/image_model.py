"""What every model of the zoo shares: CLIP's image tower (``visual``: a ModifiedResNet or a
ViT, by the config) plus the attributes the trainer, loader and evaluation read
(``image_size``, ``context_length``, ``vocab_size``, ``embed_dim``, ``encode_image``,
``objective``). Subclasses: the contrastive two-tower model (clip.py, which adds the text
tower), the captioning model (captioning.py) and the bag-of-words model (bow.py).
"""
from __future__ import annotations

import torch
from torch import nn

from .configs import CLIPConfig, ResNetConfig
from .resnet import ModifiedResNet
from .vit import VisionTransformer


def build_visual(cfg: CLIPConfig) -> nn.Module:
    v = cfg.vision
    if isinstance(v, ResNetConfig):
        return ModifiedResNet(layers=v.layers, output_dim=cfg.embed_dim, heads=v.heads,
                              input_resolution=cfg.image_size, width=v.width)
    return VisionTransformer(input_resolution=cfg.image_size, patch_size=v.patch_size,
                             width=v.width, layers=v.layers, heads=v.heads,
                             output_dim=cfg.embed_dim, act=cfg.act)


class ImageTowerModel(nn.Module):
    objective = "?"

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = build_visual(config)

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

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised projected image features, (B, embed_dim), from (B, 3, S, S)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (batch, 3, {self.image_size}, {self.image_size}),"
                             f" got shape {tuple(images.shape)}")
        return self.visual(images)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's tokens, (B, N, embed_dim): every ViT token (class token first)
        through ln_post and the projection; a ResNet's attention-pooled output as one token."""
        if hasattr(self.visual, "image_tokens"):
            self.encode_image(images[:0])  # the shape check only
            return self.visual.image_tokens(images)
        return self.encode_image(images).unsqueeze(1)
