"""open_clip model-config JSON for one of our model configs, so that ``open_clip`` (which this
project never imports) builds the same architecture and loads our OpenAI-layout export.

    from pretrain.modelio.openclip import open_clip_config, write_open_clip_config
    write_open_clip_config(model.config, "cfgs/my-vit.json")
    # then, in an environment with open_clip:
    #   open_clip.add_model_config("cfgs")
    #   model, _, preprocess = open_clip.create_model_and_transforms("my-vit", pretrained="out.safetensors")

The keys are open_clip's ``CLIPVisionCfg`` / ``CLIPTextCfg`` fields (open_clip
``src/open_clip/model.py``). Our heads follow OpenAI's rule, which open_clip expresses as
``head_width`` (ViT and text: width / heads; ResNet attention pool: width * 32 / heads).
Zoo sizes need no file: open_clip's own ``ViT-B-32-quickgelu``, ``RN50`` ... are the same
architectures (OpenAI's models use QuickGELU; open_clip's plain ``ViT-B-32`` uses GELU).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pretrain.models.configs import CLIPConfig


def open_clip_config(cfg: CLIPConfig) -> dict[str, Any]:
    """The open_clip model-config dict equal to ``cfg`` (widths, depths, heads, activation, sizes)."""
    v, t = cfg.vision, cfg.text
    if cfg.family == "vit":
        vision: dict[str, Any] = {"image_size": cfg.image_size, "layers": v.layers, "width": v.width,
                                  "patch_size": v.patch_size, "head_width": v.width // v.heads}
    else:
        vision = {"image_size": cfg.image_size, "layers": list(v.layers), "width": v.width,
                  "patch_size": None, "head_width": v.width * 32 // v.heads}
    out: dict[str, Any] = {
        "embed_dim": cfg.embed_dim, "quick_gelu": cfg.act == "quick_gelu", "vision_cfg": vision,
        "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                     "heads": t.heads, "layers": t.layers},
    }
    if cfg.init_logit_bias is not None:  # SigLIP: open_clip then builds its `logit_bias` parameter
        out["init_logit_bias"] = float(cfg.init_logit_bias)
    return out


def write_open_clip_config(cfg: CLIPConfig, path: str | Path) -> Path:
    """Write ``open_clip_config(cfg)`` as JSON; open_clip names the model after the file's stem."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(open_clip_config(cfg), indent=2) + "\n")
    return path
