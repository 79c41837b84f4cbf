"""Build the model, optimizer and DeepSpeed engine of a run.

    engine, ds_config = build_engine(cfg, world_size)

Every rank builds the model from the same seed: ZeRO-3 partitions each rank's own copy, so
the copies must be identical (ZeRO 0-2 also broadcast rank 0's weights). `model.init_from`
weights are copied into that fresh model, unless the run dir has a checkpoint to resume.
"""

from __future__ import annotations

import logging
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from pretrain.config import RunConfig
from pretrain.loss import objective_of
from pretrain.models import create_model
from pretrain.models.speed import apply_speed_switches
from pretrain.train.checkpoint import complete_tags
from pretrain.train.distributed import broadcast_object, release_shm_workspace
from pretrain.train.ds_config import build_ds_config, guards_nonfinite_in_optimizer, uses_cpu_adam
from pretrain.train.init_from import init_model_from
from pretrain.train.optim import build_optimizer

log = logging.getLogger(__name__)


def build_model(cfg: RunConfig) -> torch.nn.Module:
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model.name, objective=objective_of(cfg.train.loss), **cfg.model.overrides)
    if cfg.model.init_from and not will_resume(cfg):
        # before initialize: ZeRO-3 partitions there
        init_model_from(model, cfg.model.init_from, allow_torchscript=cfg.model.init_from_allow_torchscript_code)
    # Non-reentrant checkpointing on both towers (reentrant drops the gradient of a tower
    # whose input does not require grad: docs/models.md, parity rules).
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    m = cfg.model
    return apply_speed_switches(model, compile=m.compile, channels_last=m.channels_last,
                                ln_fp32=m.ln_fp32, patch_dropout=m.patch_dropout)


def will_resume(cfg: RunConfig) -> bool:
    """The run dir holds a complete checkpoint that `fit` will resume from (rank 0 decides
    for all ranks, as `checkpoint.resume` does): init_from must not re-initialise it."""
    if not cfg.checkpoint.resume:
        return False
    found = bool(complete_tags(cfg.output_dir)) if not dist.is_initialized() or dist.get_rank() == 0 else None
    return bool(broadcast_object(found))


def build_engine(cfg: RunConfig, world_size: int) -> tuple[Any, dict[str, Any]]:
    """`(engine, ds_config)`: the DeepSpeed engine around a fresh model and AdamW."""
    ds_config = build_ds_config(cfg, world_size)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg, cpu_adam=uses_cpu_adam(cfg), guard=guards_nonfinite_in_optimizer(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    # initialize() starts the process group itself when the caller has not (tests, notebooks):
    # DeepSpeed's shm workspace name must go then too (distributed.release_shm_workspace)
    release_shm_workspace()
    match_buffer_dtype(engine.module)
    return engine, ds_config


def match_buffer_dtype(module: torch.nn.Module) -> None:
    """DeepSpeed casts parameters to bf16/fp16 but leaves buffers in fp32; BatchNorm then
    fails on mixed dtypes ("expected scalar type BFloat16 but found Float"). Cast floating
    buffers (BatchNorm running statistics) to the parameters' dtype, as `model.half()` does."""
    dtype = next(module.parameters()).dtype
    if dtype == torch.float32:
        return
    for sub in module.modules():
        for name, buf in sub.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                setattr(sub, name, buf.to(dtype))
