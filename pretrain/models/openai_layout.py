"""Conversion between this project's CLIP modules and OpenAI's checkpoint layout
(docs/models.md; open_clip uses the same names for these models).

Our parameter names already follow that layout; the differences are the 0-dim
``logit_scale`` of the OpenAI layout (ours is shape [1], see clip.py), the JIT-archive
metadata entries OpenAI's files carry, and wrappers (``{"state_dict": ...}``,
``module.`` prefixes) that training code adds. Every size is inferred from tensor shapes;
head counts follow OpenAI's rule (width / 64; ResNet pool width * 32 / 64) unless given.

    model = from_openai_state_dict(torch.load("ViT-L-14.pt-state-dict"), image_size=336)
    torch.save(to_openai_state_dict(model), "ours_in_openai_layout.pt")
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .clip import CLIP
from .configs import CLIPConfig, ResNetConfig, TextConfig, ViTConfig

# entries of OpenAI's JIT archives / open_clip modules that are not weights
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
# overrides that a state dict cannot determine (shape-determined fields come from it)
_ALLOWED_OVERRIDES = ("act", "grad_checkpointing", "text_heads", "vision_heads")


def to_openai_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in OpenAI's layout (``logit_scale`` 0-dim). Tensors are
    detached and share storage with the model (as ``state_dict()`` does)."""
    sd = dict(model.state_dict())
    if "logit_scale" not in sd:
        raise ValueError("not a CLIP model: it has no logit_scale")
    sd["logit_scale"] = sd["logit_scale"].reshape(())
    if "logit_bias" in sd:  # SigLIP models: 0-dim, named as open_clip does
        sd["logit_bias"] = sd["logit_bias"].reshape(())
    return sd


def _clean(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": ...}``, strip a ``module.`` prefix, drop metadata entries."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    sd = dict(state_dict)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if k.split(".")[-1] not in _NON_WEIGHT_KEYS}


def _get(sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"not a CLIP state dict in OpenAI layout: missing {key!r}")
    return sd[key]


def _count_indices(sd: Mapping[str, Any], pattern: str) -> int:
    """Number of distinct integers captured by ``pattern`` (a regex with one group)."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.fullmatch(k))})


def _grid_side(n_tokens: int, what: str) -> int:
    side = math.isqrt(n_tokens - 1)
    if side * side != n_tokens - 1:
        raise ValueError(f"{what} has {n_tokens} rows, not 1 + a square grid")
    return side


def _heads(width: int, head_dim_rule: int, what: str) -> int:
    heads = width // head_dim_rule
    if heads < 1 or width % heads:
        raise ValueError(f"cannot infer {what} heads from width {width}; pass {what}_heads=")
    return heads


def infer_config(state_dict: Mapping[str, Any], act: str = "quick_gelu",
                 grad_checkpointing: bool = False, text_heads: int | None = None,
                 vision_heads: int | None = None) -> CLIPConfig:
    """The CLIPConfig of an OpenAI-layout state dict, from tensor shapes alone (works on
    meta tensors). Activation and head counts are not recorded in the weights."""
    sd = _clean(state_dict)
    embed_dim = _get(sd, "text_projection").shape[1]
    text_width = _get(sd, "ln_final.weight").shape[0]
    text = TextConfig(
        width=text_width,
        layers=_count_indices(sd, r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight"),
        heads=text_heads or _heads(text_width, 64, "text"),
        context_length=_get(sd, "positional_embedding").shape[0],
        vocab_size=_get(sd, "token_embedding.weight").shape[0],
    )
    vision: ResNetConfig | ViTConfig
    if "visual.proj" in sd:
        conv = _get(sd, "visual.conv1.weight")  # (width, 3, patch, patch)
        width, patch = conv.shape[0], conv.shape[-1]
        grid = _grid_side(_get(sd, "visual.positional_embedding").shape[0], "visual.positional_embedding")
        vision = ViTConfig(
            width=width, patch_size=patch, heads=vision_heads or _heads(width, 64, "vision"),
            layers=_count_indices(sd, r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_weight"))
        image_size, out_dim = grid * patch, sd["visual.proj"].shape[1]
    elif "visual.attnpool.c_proj.weight" in sd:
        width = _get(sd, "visual.layer1.0.conv1.weight").shape[0]
        layers = tuple(_count_indices(sd, rf"visual\.layer{i}\.(\d+)\.conv1\.weight") for i in range(1, 5))
        grid = _grid_side(_get(sd, "visual.attnpool.positional_embedding").shape[0],
                          "visual.attnpool.positional_embedding")
        vision = ResNetConfig(layers=layers, width=width,  # type: ignore[arg-type]
                              heads=vision_heads or _heads(width * 32, 64, "vision"))
        image_size, out_dim = grid * 32, sd["visual.attnpool.c_proj.weight"].shape[0]
    else:
        raise ValueError("not a CLIP state dict in OpenAI layout: no ViT ('visual.proj') or "
                         "ResNet ('visual.attnpool.c_proj.weight') image tower")
    if out_dim != embed_dim:
        raise ValueError(f"image tower outputs {out_dim} features but text_projection {embed_dim}")
    return CLIPConfig(embed_dim=embed_dim, image_size=image_size, vision=vision, text=text,
                      act=act, grad_checkpointing=grad_checkpointing)


def resize_grid_embedding(pos: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Resize a [1 + g*g, W] positional embedding to [1 + G*G, W]: the first row (class /
    mean token) is kept, the g x g grid part is interpolated bicubically
    (align_corners=False, as open_clip and timm do) in fp32."""
    grid = _grid_side(pos.shape[0], "positional embedding")
    if grid == new_grid:
        return pos.clone()
    first, rest = pos[:1], pos[1:]
    rest = rest.float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # (1, W, g, g)
    rest = F.interpolate(rest, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    rest = rest.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(pos.dtype)
    return torch.cat([first, rest], dim=0)


def resize_positional_embedding(state_dict: Mapping[str, Any], image_size: int) -> dict[str, torch.Tensor]:
    """A copy of an OpenAI-layout state dict whose image positional embedding fits
    ``image_size`` (e.g. ViT-L/14 at 224 -> 336), so it loads at that resolution."""
    sd = _clean(state_dict)
    if "visual.proj" in sd:
        key, cell = "visual.positional_embedding", _get(sd, "visual.conv1.weight").shape[-1]
    else:
        key, cell = "visual.attnpool.positional_embedding", 32
    if image_size % cell:
        raise ValueError(f"image_size {image_size} is not a multiple of {cell}")
    sd[key] = resize_grid_embedding(_get(sd, key), image_size // cell)
    return sd


def from_openai_state_dict(state_dict: Mapping[str, Any], image_size: int | None = None,
                           device: torch.device | str = "cpu", **overrides: Any) -> CLIP:
    """Build the model an OpenAI-layout state dict describes and load its weights (fp32).

    ``image_size`` resizes the image positional embedding first (bicubic); other
    overrides may set only what shapes cannot tell: act, grad_checkpointing, text_heads,
    vision_heads."""
    bad = sorted(set(overrides) - set(_ALLOWED_OVERRIDES))
    if bad:
        raise ValueError(f"override(s) {bad} cannot be applied to a checkpoint (its shapes "
                         f"fix them); allowed: image_size and {list(_ALLOWED_OVERRIDES)}")
    sd = _clean(state_dict)
    if image_size is not None:
        sd = resize_positional_embedding(sd, image_size)
    config = infer_config(sd, **overrides)
    sd["logit_scale"] = _get(sd, "logit_scale").reshape(1)
    if "logit_bias" in sd:  # a SigLIP checkpoint: the model gets the parameter, then its value
        sd["logit_bias"] = sd["logit_bias"].reshape(1)
        config = dataclasses.replace(config, init_logit_bias=float(sd["logit_bias"]))
    # build without running the random init (it would be overwritten), then load
    with torch.device("meta"):
        model = CLIP(config)
    model = model.to_empty(device=device)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # BatchNorm fills a missing num_batches_tracked itself; anything else is an error
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"state dict does not match the inferred {config.family} config: "
                         f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model
