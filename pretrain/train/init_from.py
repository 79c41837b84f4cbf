"""`model.init_from`: start a fresh run from finished weights (e.g. ViT-L/14@336 from ViT-L/14).

    init_model_from(model, "runs/vit_l14")          # newest complete checkpoint, consolidated
    init_model_from(model, "/weights/ViT-L-14.safetensors")  # an OpenAI-layout state dict file
    init_model_from(model, "hf:/weights/clip-vit-base-patch32")  # a Hugging Face CLIP dir

The source is loaded with `from_openai_state_dict(sd, image_size=model.image_size)`, so the
image positional embedding is interpolated to this run's resolution; every other tensor
must match the model's names and shapes (else a ValueError lists the differences). The
trainer calls it on the fresh module before `deepspeed.initialize` (ZeRO-3 partitions the
module there) and only when the run dir has no complete checkpoint to resume from.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.modelio import (TorchScriptRefused, UnsafeCheckpointError, consolidated_state_dict, is_hf_dir,
                              is_run_dir, load_state_dict_file, read_hf_dir)

log = logging.getLogger(__name__)


def load_source_state_dict(source: str | Path, allow_torchscript: bool = False) -> dict[str, Any]:
    """The weights `source` names: a run dir (consolidated fp32, any ZeRO stage) or a file,
    read weights-only by pretrain.modelio (a TorchScript file only with `allow_torchscript`)."""
    path = Path(str(source).removeprefix("hf:"))
    try:
        if str(source).startswith("hf:") or is_hf_dir(path):
            return read_hf_dir(path)[0]
        if path.is_dir():
            if not is_run_dir(path):
                raise ValueError("a directory must be a training run dir (run_config.yaml + checkpoints/)")
            return consolidated_state_dict(path)
        if not path.is_file():
            raise FileNotFoundError("no such run dir or weights file")
        return load_state_dict_file(path, allow_torchscript=allow_torchscript)
    except TorchScriptRefused as e:
        raise TorchScriptRefused(f"model.init_from={source}: {e}; set model.init_from_allow_torchscript_code=true "
                                 "to accept it") from e
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"model.init_from={source}: {e}") from e
    except FileNotFoundError as e:
        raise FileNotFoundError(f"model.init_from={source}: {e}") from e
    except ValueError as e:
        raise ValueError(f"model.init_from={source}: {e}") from e


def init_model_from(model: nn.Module, source: str | Path, allow_torchscript: bool = False) -> None:
    """Copy the weights of `source` into `model` in place (positional embedding resized)."""
    from pretrain.models import from_openai_state_dict

    loaded = from_openai_state_dict(load_source_state_dict(source, allow_torchscript), image_size=model.image_size)
    src, dst = loaded.state_dict(), model.state_dict()
    # a SigLIP run may start from CLIP weights: its fresh logit_bias is kept
    optional = {"logit_bias"} - set(src)
    missing = sorted(set(dst) - set(src) - optional)
    unexpected = sorted(set(src) - set(dst))
    shapes = [f"{k}: {tuple(src[k].shape)} vs model {tuple(dst[k].shape)}"
              for k in sorted(set(src) & set(dst)) if src[k].shape != dst[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"model.init_from={source} does not match this run's model architecture: "
                         f"missing {missing[:8]}, unexpected {unexpected[:8]}, shape mismatches {shapes[:8]}")
    with torch.no_grad():
        for k, v in src.items():
            dst[k].copy_(v)
    log.info("model initialised from %s (%d tensors; image positional embedding at %d px)",
             source, len(src), model.image_size)
