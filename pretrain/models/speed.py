"""Model-side speed switches (the run config's ``model.compile``, ``model.channels_last``,
``model.ln_fp32``, ``model.patch_dropout``; docs/speed.md), applied to a built CLIP model
in place. None changes a parameter name: the state dict keeps OpenAI's layout.

    from pretrain.models import create_model
    from pretrain.models.speed import apply_speed_switches
    model = apply_speed_switches(create_model("ViT-B/16"), compile="blocks", patch_dropout=0.5)

Regional compilation: each residual attention block and each ResNet bottleneck is compiled
on its own with ``nn.Module.compile()`` (which compiles the call in place, so no
``_orig_mod.`` wrapper enters the keys). Identical blocks share one compiled graph, so
compile time does not grow with depth; the loss, the stem/pool and the DeepSpeed engine
stay eager. It composes with activation checkpointing: the checkpoint wraps the compiled
call.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import LayerNorm, ResidualAttentionBlock
from .resnet import Bottleneck, ModifiedResNet
from .vit import VisionTransformer

COMPILE_MODES = ("none", "blocks")


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compile every ResidualAttentionBlock and Bottleneck of ``model`` in place;
    returns how many were compiled. ``backend`` is torch.compile's (``"aot_eager"``: the same
    graph capture and autograd tracing without inductor's code generation, to debug one or
    the other)."""
    blocks = [m for m in model.modules() if isinstance(m, (ResidualAttentionBlock, Bottleneck))]
    # all blocks share one forward code object, so each distinct block shape (a ResNet has
    # two per stage) and grad mode is one more cache entry of it: lift dynamo's default of 8
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    for block in blocks:
        # static shapes: the training shapes are fixed (and inductor's symbolic-shape path
        # fails on the bottleneck's average pool in torch 2.13 on CPU)
        block.compile(dynamic=False, backend=backend)
    return len(blocks)


def apply_speed_switches(model: nn.Module, compile: str = "none", channels_last: bool = False,
                         ln_fp32: bool = True, patch_dropout: float = 0.0) -> nn.Module:
    """Set the switches on ``model`` (a CLIP) and return it. Raises ValueError for a switch
    that does not apply to this model's image tower."""
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
    visual = getattr(model, "visual", model)
    if channels_last:
        if not isinstance(visual, ModifiedResNet):
            raise ValueError("channels_last applies to ResNet image towers only")
        visual.channels_last = True
        visual.to(memory_format=torch.channels_last)
    if patch_dropout:
        if not isinstance(visual, VisionTransformer):
            raise ValueError("patch_dropout applies to ViT image towers only")
        visual.patch_dropout = float(patch_dropout)
    for m in model.modules():
        if isinstance(m, LayerNorm):
            m.fp32 = bool(ln_fp32)
    if compile == "blocks":
        compile_blocks(model)
    return model
