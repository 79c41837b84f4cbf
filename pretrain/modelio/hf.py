"""Hugging Face ``transformers`` CLIP format, both ways, for the ViT models of the zoo.

A directory written by ``save_hf_dir`` loads with ``transformers.CLIPModel.from_pretrained``,
``CLIPProcessor`` and ``CLIPTokenizer`` (config.json, model.safetensors, vocab.json +
merges.txt, preprocessor_config.json); ``read_hf_dir`` turns such a directory, or one that
transformers wrote itself (e.g. OpenAI's released ViT-B/32 converted to HF), back into an
OpenAI-layout state dict plus the overrides the weights cannot tell (activation, heads).
Only safetensors (or a weights-only ``pytorch_model.bin``) is read; nothing is downloaded.
transformers has no ModifiedResNet, so ResNets are refused.

    save_hf_dir(model, "out/hf", tokenizer=default_tokenizer())
    sd, overrides = read_hf_dir("out/hf")   # -> from_openai_state_dict(sd, **overrides)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

HF_WEIGHTS = "model.safetensors"
HF_PICKLE_WEIGHTS = "pytorch_model.bin"
# our activation names -> transformers' hidden_act (the same functions)
_ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu"}
_ACT_FROM_HF = {v: k for k, v in _ACT_TO_HF.items()}
# One table per name pair, OpenAI layout -> transformers; both converters read it, so the
# two directions cannot drift apart. Per block (q/k/v are split out of in_proj separately):
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
          "attn.out_proj": "self_attn.out_proj"}
# Outside the blocks: (ours, transformers', stored transposed). transformers keeps the
# projections as nn.Linear weights (out x in), OpenAI as x @ proj matrices (in x out).
_TOP = [
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight", False),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight", False),
    ("ln_final.weight", "text_model.final_layer_norm.weight", False),
    ("ln_final.bias", "text_model.final_layer_norm.bias", False),
    ("text_projection", "text_projection.weight", True),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding", False),
    ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight", False),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight", False),
    ("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight", False),  # sic: transformers' name
    ("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias", False),
    ("visual.ln_post.weight", "vision_model.post_layernorm.weight", False),
    ("visual.ln_post.bias", "vision_model.post_layernorm.bias", False),
    ("visual.proj", "visual_projection.weight", True),
]
# (our tower prefix, transformers' tower prefix)
_TOWERS = [("transformer.resblocks.", "text_model.encoder.layers."),
           ("visual.transformer.resblocks.", "vision_model.encoder.layers.")]


def is_hf_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and (
        (p / HF_WEIGHTS).is_file() or (p / HF_PICKLE_WEIGHTS).is_file())


def _n_layers(sd: dict[str, Any], prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)})


def openai_to_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI-layout ViT CLIP weights -> transformers CLIPModel names (fresh tensors)."""
    if "visual.proj" not in sd:
        raise ValueError("transformers' CLIPModel has no ModifiedResNet image tower: only ViT models "
                         "can be written in Hugging Face format")
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _TOWERS:
        for i in range(_n_layers(sd, ours)):
            s, d = f"{ours}{i}.", f"{theirs}{i}."
            for a, b in _BLOCK.items():
                for p in ("weight", "bias"):
                    out[d + b + "." + p] = sd[s + a + "." + p]
            for p in ("weight", "bias"):
                for x, t in zip("qkv", sd[s + "attn.in_proj_" + p].chunk(3, dim=0)):
                    out[d + f"self_attn.{x}_proj." + p] = t
    for ours, theirs, transposed in _TOP:
        out[theirs] = sd[ours].t() if transposed else sd[ours]
    out["logit_scale"] = sd["logit_scale"].reshape(())
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def hf_to_openai_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPModel weights -> OpenAI layout (``logit_scale`` 0-dim)."""
    hf = {k: v for k, v in hf.items() if not k.endswith("position_ids")}  # a buffer, not a weight
    missing = [k for k in ("visual_projection.weight", "text_projection.weight", "logit_scale") if k not in hf]
    if missing:
        raise ValueError(f"not a transformers CLIPModel state dict (with projections): missing {missing}")
    sd: dict[str, torch.Tensor] = {}
    try:
        for ours, theirs in _TOWERS:
            for i in range(_n_layers(hf, theirs)):
                s, d = f"{theirs}{i}.", f"{ours}{i}."
                for a, b in _BLOCK.items():
                    for p in ("weight", "bias"):
                        sd[d + a + "." + p] = hf[s + b + "." + p]
                for p in ("weight", "bias"):
                    sd[d + "attn.in_proj_" + p] = torch.cat([hf[s + f"self_attn.{x}_proj." + p] for x in "qkv"])
        for ours, theirs, transposed in _TOP:
            sd[ours] = hf[theirs].t() if transposed else hf[theirs]
        sd["logit_scale"] = hf["logit_scale"].reshape(())
    except KeyError as e:
        raise ValueError(f"not a transformers CLIPModel state dict: missing {e}") from None
    used = len(sd) + 2 * sum(1 for k in sd if "in_proj_" in k)  # each in_proj came from 3 tensors
    if used != len(hf):
        raise ValueError(f"transformers state dict has {len(hf) - used} tensors this converter does not know")
    return {k: v.float().contiguous() for k, v in sd.items()}


def hf_config(model) -> dict[str, Any]:
    """transformers' CLIPConfig (as config.json) for one of our ViT models."""
    cfg = model.config
    if cfg.family != "vit":
        raise ValueError("transformers' CLIPModel has no ModifiedResNet image tower: ResNet models "
                         "cannot be exported in Hugging Face format (use the OpenAI layout)")
    if getattr(model, "logit_bias", None) is not None:
        raise ValueError("transformers' CLIPModel has no logit_bias: SigLIP-trained models cannot be "
                         "exported in Hugging Face format")
    if cfg.act not in _ACT_TO_HF:
        raise ValueError(f"activation {cfg.act!r} has no transformers equivalent")
    act, t, v = _ACT_TO_HF[cfg.act], cfg.text, cfg.vision
    eot = t.vocab_size - 1  # our tokenizer's EOT is the last id (the text tower pools at it)
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": float(cfg.init_logit_scale), "torch_dtype": "float32",
        "text_config": {"model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
                        "intermediate_size": 4 * t.width, "num_hidden_layers": t.layers,
                        "num_attention_heads": t.heads, "max_position_embeddings": t.context_length,
                        "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": cfg.embed_dim,
                        "bos_token_id": eot - 1, "eos_token_id": eot, "pad_token_id": eot},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": v.width,
                          "intermediate_size": 4 * v.width, "num_hidden_layers": v.layers,
                          "num_attention_heads": v.heads, "image_size": cfg.image_size,
                          "patch_size": v.patch_size, "num_channels": 3, "hidden_act": act,
                          "layer_norm_eps": 1e-5, "projection_dim": cfg.embed_dim},
    }


def preprocessor_config(image_size: int) -> dict[str, Any]:
    """CLIPImageProcessor settings of our eval transform: shorter side to image_size
    (bicubic), centre crop, CLIP mean/std."""
    from pretrain.data.transforms import CLIP_MEAN, CLIP_STD

    return {"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
            "do_resize": True, "size": {"shortest_edge": image_size}, "resample": 3,
            "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True}


def write_tokenizer_files(tokenizer, out: Path, context_length: int) -> None:
    """vocab.json + merges.txt (+ the special tokens) for transformers' CLIPTokenizer."""
    from pretrain.tokenizer import EOT, SOT

    spec = json.loads(tokenizer._tk.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # the first line is a header, as in OpenAI's merges file (CLIPTokenizer skips it)
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": SOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}), encoding="utf-8")
    # pad = EOT as in OpenAI's HF release (ours pads with id 0; a pad token becomes a special
    # token that transformers matches inside text, so "!" (id 0) would split "!!"). The text
    # tower pools at the first EOT behind a causal mask: padding never changes the embedding.
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "bos_token": SOT,
         "eos_token": EOT, "unk_token": EOT, "pad_token": EOT, "errors": "replace",
         "processor_class": "CLIPProcessor"}), encoding="utf-8")


def save_hf_dir(model, out: str | os.PathLike, tokenizer=None) -> Path:
    """Write ``model`` (one of our ViT CLIPs) as a transformers CLIPModel directory."""
    from safetensors.torch import save_file

    from pretrain.models import to_openai_state_dict

    config = hf_config(model)  # refuses ResNets before anything is written
    if tokenizer is not None and tokenizer.vocab_size != model.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids, the model {model.vocab_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(openai_to_hf_state_dict(to_openai_state_dict(model)), str(out / HF_WEIGHTS),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(model.image_size), indent=2),
                                                  encoding="utf-8")
    if tokenizer is not None:
        write_tokenizer_files(tokenizer, out, model.context_length)
    return out


def read_hf_dir(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(OpenAI-layout state dict, overrides for ``from_openai_state_dict``) of a transformers
    CLIPModel directory. Weights: model.safetensors, else pytorch_model.bin read weights-only."""
    from safetensors.torch import load_file

    p = Path(str(path).removeprefix("hf:"))
    if not is_hf_dir(p):
        raise FileNotFoundError(f"{p}: not a Hugging Face CLIP directory (config.json + {HF_WEIGHTS})")
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
        tcfg, vcfg = cfg["text_config"], cfg["vision_config"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{p}/config.json: not a transformers CLIPConfig ({e})") from None
    acts = {tcfg.get("hidden_act", "quick_gelu"), vcfg.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= set(_ACT_FROM_HF):
        raise ValueError(f"{p}: hidden_act {sorted(acts)} is not supported (one of {sorted(_ACT_FROM_HF)} "
                         "for both towers)")
    for name, c in (("text_config", tcfg), ("vision_config", vcfg)):
        width, mlp = c.get("hidden_size"), c.get("intermediate_size")
        if width is not None and mlp is not None and mlp != 4 * width:  # our blocks have MLP ratio 4
            raise ValueError(f"{p}: {name}.intermediate_size {mlp} is not 4 x hidden_size {width}; "
                             "only CLIP's MLP ratio 4 is supported")
    if (p / HF_WEIGHTS).is_file():
        try:
            hf = load_file(str(p / HF_WEIGHTS))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{p / HF_WEIGHTS}: not a safetensors file: {e}") from None
    else:
        from pretrain.modelio.load import load_state_dict_file

        hf = load_state_dict_file(p / HF_PICKLE_WEIGHTS)
    overrides = {"act": _ACT_FROM_HF[acts.pop()], "text_heads": int(tcfg["num_attention_heads"]),
                 "vision_heads": int(vcfg["num_attention_heads"])}
    return hf_to_openai_state_dict(hf), overrides
