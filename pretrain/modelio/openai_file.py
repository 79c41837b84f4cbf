"""The weights of an OpenAI-layout file, as every writer here stores them (the export CLI's
`.safetensors` / `.pt`, the MLflow model's `weights.safetensors`).

    from pretrain.modelio.openai_file import OPENAI_METADATA, openai_weights
    safetensors.torch.save_file(openai_weights(model), path, metadata=OPENAI_METADATA)
"""
from __future__ import annotations

import torch

# safetensors header metadata: readers (ours, open_clip's) expect torch tensors in OpenAI's names
OPENAI_METADATA = {"format": "pt", "layout": "openai"}


def openai_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state in OpenAI's key names: floating tensors as fp32, every tensor a fresh
    contiguous copy (safetensors refuses tensors that share storage, as tied views do)."""
    from pretrain.models import to_openai_state_dict

    return {k: v.detach().float().contiguous().clone() if v.is_floating_point() else v.detach().clone()
            for k, v in to_openai_state_dict(model).items()}
