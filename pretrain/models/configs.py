"""Typed model configs: the nine models of the CLIP paper (arXiv 2103.00020; docs/models.md) and two tiny
ones ("RN-tiny", "ViT-tiny") sized for CPU tests and demos.

Heads follow OpenAI's rule (ViT and text: width / 64; ResNet attention pool:
width * 32 / 64) so that every config can be recovered from checkpoint tensor shapes.

    python -c "from pretrain.models import MODEL_CONFIGS; print(MODEL_CONFIGS['RN50'])"
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Union

from .layers import ACTIVATIONS


@dataclass(frozen=True)
class TextConfig:
    width: int = 512
    layers: int = 12
    heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408

    def __post_init__(self) -> None:
        _check_positive(self, "width", "layers", "heads", "context_length", "vocab_size")
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not divisible by heads {self.heads}")


@dataclass(frozen=True)
class ResNetConfig:
    """ModifiedResNet; ``heads`` is the attention pool's head count."""
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    width: int = 64
    heads: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ValueError(f"ResNet layers must be 4 positive stage depths, got {self.layers}")
        _check_positive(self, "width", "heads")
        if (self.width * 32) % self.heads:
            raise ValueError(f"attention-pool width {self.width * 32} is not divisible by "
                             f"heads {self.heads}")


@dataclass(frozen=True)
class ViTConfig:
    width: int = 768
    layers: int = 12
    heads: int = 12
    patch_size: int = 32

    def __post_init__(self) -> None:
        _check_positive(self, "width", "layers", "heads", "patch_size")
        if self.width % self.heads:
            raise ValueError(f"ViT width {self.width} is not divisible by heads {self.heads}")


VisionConfig = Union[ResNetConfig, ViTConfig]


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int
    image_size: int
    vision: VisionConfig
    text: TextConfig = field(default_factory=TextConfig)
    act: str = "quick_gelu"  # OpenAI's release; "gelu" for later open_clip-style models
    grad_checkpointing: bool = False
    # log of the initial temperature (CLIP: log(1/0.07); SigLIP: log(10))
    init_logit_scale: float = math.log(1 / 0.07)
    # None: no logit bias (CLIP). A float adds a learnable [1]-shaped ``logit_bias`` (SigLIP: -10)
    init_logit_bias: float | None = None

    def __post_init__(self) -> None:
        _check_positive(self, "embed_dim", "image_size")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {self.act!r}")
        if isinstance(self.vision, ViTConfig) and self.image_size % self.vision.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the patch "
                             f"size {self.vision.patch_size}")
        if isinstance(self.vision, ResNetConfig) and self.image_size % 32:
            raise ValueError(f"ResNet image_size must be a multiple of 32, got {self.image_size}")
        if not math.isfinite(float(self.init_logit_scale)):
            raise ValueError(f"init_logit_scale must be finite, got {self.init_logit_scale!r}")
        if self.init_logit_bias is not None and not math.isfinite(float(self.init_logit_bias)):
            raise ValueError(f"init_logit_bias must be finite or None, got {self.init_logit_bias!r}")

    @property
    def family(self) -> str:
        return "resnet" if isinstance(self.vision, ResNetConfig) else "vit"

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON friendly), with the family named."""
        d = dataclasses.asdict(self)
        d["vision"]["family"] = self.family
        if self.family == "resnet":
            d["vision"]["layers"] = list(self.vision.layers)  # type: ignore[union-attr]
        return d


def _check_positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive int, got {value!r}")


def _resnet(embed: int, layers: tuple[int, int, int, int], width: int, px: int,
            text_width: int) -> CLIPConfig:
    return CLIPConfig(embed_dim=embed, image_size=px,
                      vision=ResNetConfig(layers=layers, width=width, heads=width * 32 // 64),
                      text=TextConfig(width=text_width, layers=12, heads=text_width // 64))


def _vit(embed: int, width: int, layers: int, patch: int, px: int, text_width: int) -> CLIPConfig:
    return CLIPConfig(embed_dim=embed, image_size=px,
                      vision=ViTConfig(width=width, layers=layers, heads=width // 64, patch_size=patch),
                      text=TextConfig(width=text_width, layers=12, heads=text_width // 64))


MODEL_CONFIGS: dict[str, CLIPConfig] = {
    "RN50": _resnet(1024, (3, 4, 6, 3), 64, 224, 512),
    "RN101": _resnet(512, (3, 4, 23, 3), 64, 224, 512),
    "RN50x4": _resnet(640, (4, 6, 10, 6), 80, 288, 640),
    "RN50x16": _resnet(768, (6, 8, 18, 8), 96, 384, 768),
    "RN50x64": _resnet(1024, (3, 15, 36, 10), 128, 448, 1024),
    "ViT-B/32": _vit(512, 768, 12, 32, 224, 512),
    "ViT-B/16": _vit(512, 768, 12, 16, 224, 512),
    "ViT-L/14": _vit(768, 1024, 24, 14, 224, 768),
    "ViT-L/14@336": _vit(768, 1024, 24, 14, 336, 768),
    # Tiny models for CPU tests/demos: full vocabulary and context (the real tokenizer
    # works), narrow and shallow towers; heads still follow the width/64 rule.
    "RN-tiny": CLIPConfig(embed_dim=64, image_size=64,
                          vision=ResNetConfig(layers=(1, 1, 1, 1), width=8, heads=4),
                          text=TextConfig(width=64, layers=2, heads=1)),
    "ViT-tiny": CLIPConfig(embed_dim=64, image_size=64,
                           vision=ViTConfig(width=128, layers=2, heads=2, patch_size=16),
                           text=TextConfig(width=64, layers=2, heads=1)),
}

PAPER_MODELS: tuple[str, ...] = tuple(n for n in MODEL_CONFIGS if not n.endswith("-tiny"))
