"""CLIP model zoo: ModifiedResNet / ViT image towers, the causal text tower, the two-tower
model, named configs and OpenAI-layout state-dict conversion.

    from pretrain.models import create_model, list_models
    model = create_model("ViT-tiny")            # or "RN50", "ViT-L/14@336", ...
    img, txt, scale = model(images, tokens)     # normalised features, exp'd logit scale

No torch.distributed / deepspeed imports anywhere in this package.
"""
from .clip import CLIP
from .configs import MODEL_CONFIGS, PAPER_MODELS, CLIPConfig, ResNetConfig, TextConfig, ViTConfig
from .factory import OVERRIDE_KEYS, apply_overrides, create_model, get_config, list_models

__all__ = [
    "CLIP", "CLIPConfig", "ResNetConfig", "TextConfig", "ViTConfig", "MODEL_CONFIGS",
    "PAPER_MODELS", "OVERRIDE_KEYS", "apply_overrides", "create_model", "get_config",
    "list_models",
]
