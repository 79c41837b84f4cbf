"""Named-model factory: ``list_models()`` and ``create_model(name, **overrides)``.

Overrides (flat keyword arguments, so a run config can carry them as a small dict):
  embed_dim, image_size, act ("quick_gelu" | "gelu"), grad_checkpointing,
  context_length, vocab_size, text_width, text_layers, text_heads,
  vision_width, vision_layers (int for ViT, 4 ints for ResNet), vision_heads,
  vision_patch_size (ViT only), init_logit_scale (log of the initial temperature),
  init_logit_bias (adds a learnable SigLIP ``logit_bias``; None/absent = no bias).
``objective`` picks the model class (``OBJECTIVES``: contrastive, captioning, bow).
An unknown key raises ValueError naming the valid ones. Changing a width without its
heads sets heads by OpenAI's rule (width / 64; ResNet pool width * 32 / 64), which is what
``from_openai_state_dict`` assumes when it re-creates a model from weights alone.

    python -c "from pretrain.models import create_model; print(create_model('ViT-tiny'))"
"""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .bow import BagOfWordsModel
from .captioning import CaptioningModel
from .clip import CLIP
from .configs import MODEL_CONFIGS, CLIPConfig, ResNetConfig, ViTConfig

# the model class of each training objective; "contrastive" (CLIP, SigLIP) is the default
OBJECTIVE_MODELS: dict[str, type[nn.Module]] = {
    "contrastive": CLIP, "captioning": CaptioningModel, "bow": BagOfWordsModel}
OBJECTIVES: tuple[str, ...] = tuple(OBJECTIVE_MODELS)

_TOP = ("embed_dim", "image_size", "act", "grad_checkpointing", "init_logit_scale", "init_logit_bias")
_TEXT = {"context_length": "context_length", "vocab_size": "vocab_size",
         "text_width": "width", "text_layers": "layers", "text_heads": "heads"}
_VISION = {"vision_width": "width", "vision_layers": "layers", "vision_heads": "heads",
           "vision_patch_size": "patch_size"}
OVERRIDE_KEYS: tuple[str, ...] = _TOP + tuple(_TEXT) + tuple(_VISION)


def list_models() -> list[str]:
    """Names accepted by ``create_model``: the nine paper models, then the tiny ones."""
    return list(MODEL_CONFIGS)


def apply_overrides(config: CLIPConfig, **overrides: Any) -> CLIPConfig:
    """A new config with the flat overrides applied (validated by the dataclasses)."""
    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if unknown:
        raise ValueError(f"unknown model override(s) {unknown}; valid: {list(OVERRIDE_KEYS)}")
    if "vision_patch_size" in overrides and not isinstance(config.vision, ViTConfig):
        raise ValueError("vision_patch_size applies to ViT models only")
    text_kw = {_TEXT[k]: v for k, v in overrides.items() if k in _TEXT}
    vision_kw = {_VISION[k]: v for k, v in overrides.items() if k in _VISION}
    # a new width keeps OpenAI's heads rule unless heads are given too: checkpoints carry
    # no head count, so only rule-following models can be re-created from their weights
    if "width" in text_kw and "heads" not in text_kw and isinstance(text_kw["width"], int):
        text_kw["heads"] = max(1, text_kw["width"] // 64)
    if "width" in vision_kw and "heads" not in vision_kw and isinstance(vision_kw["width"], int):
        rule_width = vision_kw["width"] * (32 if isinstance(config.vision, ResNetConfig) else 1)
        vision_kw["heads"] = max(1, rule_width // 64)
    text = dataclasses.replace(config.text, **text_kw)
    vision = dataclasses.replace(config.vision, **vision_kw)
    top = {k: v for k, v in overrides.items() if k in _TOP}
    return dataclasses.replace(config, text=text, vision=vision, **top)


def get_config(name: str, **overrides: Any) -> CLIPConfig:
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {list_models()}")
    return apply_overrides(MODEL_CONFIGS[name], **overrides)


def create_model(name: str, objective: str = "contrastive", **overrides: Any) -> nn.Module:
    """A freshly initialised model (fp32, on the current default device; build inside
    ``with torch.device("meta"):`` to size a model without allocating it). ``objective``:
    "contrastive" (the two-tower CLIP), "captioning" (image tower + text decoder, the text
    config sizes the decoder) or "bow" (image tower + bag-of-words head); the same name
    gives the same image tower for all three."""
    if objective not in OBJECTIVE_MODELS:
        raise ValueError(f"unknown objective {objective!r}; choose one of {list(OBJECTIVES)}")
    return OBJECTIVE_MODELS[objective](get_config(name, **overrides))
