"""Clamp CLIP's learnable temperature so that exp(t) <= max after every optimizer step.

With ZeRO (and bf16/fp16) the module's parameter is only a low-precision working copy: the
optimizer updates an fp32 master copy and overwrites the module's copy from it at the next
step. Clamping the module parameter alone would be undone, so both copies are clamped,
through DeepSpeed's public safe_*_fp32_param API:
- ZeRO-3: each rank clamps its local partition (master and working copy) and the gathered
  copy of a persistent parameter (no collective);
- ZeRO-1/2: the full fp32 master value is read (a tiny all-reduce), clamped and written back,
  and the replicated working copy is clamped in place;
- ZeRO-0 fp32: there is no master copy; the parameter is clamped in place.
Clamping is element-wise, so clamping partitions equals clamping the whole tensor.
Must be called on every rank (ZeRO-1/2 reads are collective).
"""

from __future__ import annotations

import torch
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_local_fp32_param, safe_set_full_fp32_param,
                             safe_set_local_fp32_param)


@torch.no_grad()
def clamp_logit_scale(param: torch.nn.Parameter, max_log: float) -> None:
    """Clamp `param` (the model's `logit_scale`, shape [1]) and its fp32 master to <= max_log."""
    if hasattr(param, "ds_id"):  # ZeRO-3 partitioned parameter
        local = safe_get_local_fp32_param(param)
        if local is not None:
            safe_set_local_fp32_param(param, local.clamp(max=max_log))
        param.ds_tensor.data.clamp_(max=max_log)
        # A small parameter stays gathered between steps (stage3_param_persistence_threshold):
        # its full working copy is then what the next forward reads (empty when partitioned).
        param.data.clamp_(max=max_log)
        return
    master = safe_get_full_fp32_param(param)
    if master is not None:
        safe_set_full_fp32_param(param, master.clamp(max=max_log))
    param.data.clamp_(max=max_log)


@torch.no_grad()
def read_logit_scale(param: torch.nn.Parameter) -> float:
    """exp(t) from the fp32 master where there is one (collective under ZeRO-1/2/3)."""
    if hasattr(param, "ds_id"):
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        with GatheredParameters([param]):
            return float(param.detach().float().exp().reshape(-1)[0])
    master = safe_get_full_fp32_param(param)
    value = master if master is not None else param.detach()
    return float(value.float().exp().reshape(-1)[0])
