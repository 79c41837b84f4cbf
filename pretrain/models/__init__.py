"""CLIP model zoo: ModifiedResNet / ViT image towers, the causal text tower, the two-tower
model, named configs and OpenAI-layout state-dict conversion.

    from pretrain.models import create_model, list_models
    model = create_model("ViT-tiny")            # or "RN50", "ViT-L/14@336", ...
    img, txt, scale = model(images, tokens)     # normalised features, exp'd logit scale
    cap = create_model("ViT-tiny", objective="captioning")  # or "bow": the paper's baselines
    logits, targets = cap(images, tokens)       # caption positions' logits and token targets
    sd = to_openai_state_dict(model)            # OpenAI / open_clip key layout
    model = from_openai_state_dict(sd, image_size=336)  # config inferred from shapes

No imports of collectives or of the DeepSpeed engine anywhere in this package.
"""
from .bow import BagOfWordsModel, bag_of_words
from .captioning import CaptioningModel, caption_targets
from .clip import CLIP
from .configs import MODEL_CONFIGS, PAPER_MODELS, CLIPConfig, ResNetConfig, TextConfig, ViTConfig
from .factory import OBJECTIVES, OVERRIDE_KEYS, apply_overrides, create_model, get_config, list_models
from .openai_layout import (from_openai_state_dict, infer_config, resize_grid_embedding,
                            resize_positional_embedding, to_openai_state_dict)

__all__ = [
    "BagOfWordsModel", "CaptioningModel", "OBJECTIVES", "bag_of_words", "caption_targets",
    "CLIP", "CLIPConfig", "ResNetConfig", "TextConfig", "ViTConfig", "MODEL_CONFIGS",
    "PAPER_MODELS", "OVERRIDE_KEYS", "apply_overrides", "create_model", "get_config",
    "list_models", "from_openai_state_dict", "to_openai_state_dict", "infer_config",
    "resize_positional_embedding", "resize_grid_embedding",
]
