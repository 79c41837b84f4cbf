"""Optimizer and learning-rate schedule of a run.

- AdamW with two parameter groups: weight decay on >= 2-D weights only; none on gains,
  biases, embeddings (token / positional / class embeddings), the logit scale or
  SigLIP's logit bias.
- The schedule is a pure function of the step (linear warmup, then cosine), set on the
  optimizer before every step, so a resumed run gets it back from the restored step alone.
- `SkipNonFiniteAdamW`: for ZeRO-0 fp32, where no DeepSpeed wrapper checks gradients, it
  computes the global gradient norm, skips the update when it is not finite (exposing
  DeepSpeed's `overflow` / `_global_grad_norm` attributes) and clips otherwise.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from pretrain.config import RunConfig

log = logging.getLogger(__name__)

# Parameters whose name contains one of these are never decayed, whatever their shape.
NO_DECAY_NAME_PARTS = ("embedding", "logit_scale", "logit_bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """`[{"params": decayed, "weight_decay": wd}, {"params": rest, "weight_decay": 0}]`."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and not any(part in name for part in NO_DECAY_NAME_PARTS):
            decay.append(p)
        else:
            no_decay.append(p)
    n_decay, n_rest = sum(p.numel() for p in decay), sum(p.numel() for p in no_decay)
    log.info("optimizer groups: weight decay %g on %d tensors (%d params), none on %d tensors (%d params)",
             weight_decay, len(decay), n_decay, len(no_decay), n_rest)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adam_hparams(cfg: RunConfig) -> dict[str, Any]:
    """lr, betas, eps, weight_decay with the paper's defaults filled in (beta2 0.98; eps 1e-6
    for ViTs, 1e-8 for ResNets)."""
    o = cfg.optimizer
    betas = tuple(o.betas) if o.betas is not None else (0.9, 0.98)
    eps = o.eps if o.eps is not None else (1e-6 if cfg.model.is_vit else 1e-8)
    return {"lr": o.lr, "betas": betas, "eps": eps, "weight_decay": o.weight_decay}


class SkipNonFiniteAdamW(torch.optim.AdamW):
    """AdamW that skips (and reports) a step with a non-finite gradient norm, and clips.

    Used under ZeRO-0 fp32 only, where DeepSpeed all-reduces gradients before `step()`, so
    every rank sees the same gradients and takes the same decision.
    """

    def __init__(self, params: Any, max_grad_norm: float = 0.0, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self.overflow = False  # read by DeepSpeed's engine: True = step not applied
        self._global_grad_norm: float | None = None  # read by engine.get_global_grad_norm()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            self.overflow, self._global_grad_norm = False, 0.0
            return None
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        self._global_grad_norm = float(norm)
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            self.zero_grad(set_to_none=True)
            return None
        if self.max_grad_norm > 0 and self._global_grad_norm > self.max_grad_norm:
            coef = self.max_grad_norm / (self._global_grad_norm + 1e-6)
            torch._foreach_mul_(grads, coef)
        return super().step(closure)


def kernel_options(kernel: str) -> dict[str, bool]:
    """torch AdamW's keyword for `optimizer.kernel`: {} keeps torch's own choice."""
    if kernel == "foreach":
        return {"foreach": True}
    if kernel == "fused":
        return {"fused": True}
    return {}


def build_optimizer(model: nn.Module, cfg: RunConfig, *, cpu_adam: bool, guard: bool) -> torch.optim.Optimizer:
    """The client optimizer handed to `deepspeed.initialize`. The parameter groups are built
    once here; `optimizer.kernel` picks torch AdamW's multi-tensor or fused kernel."""
    hp = adam_hparams(cfg)
    groups = param_groups(model, hp.pop("weight_decay"))
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # JIT-builds its op on first use

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **hp)
    hp.update(kernel_options(cfg.optimizer.kernel))
    if guard:
        return SkipNonFiniteAdamW(groups, max_grad_norm=cfg.train.grad_clip, **hp)
    return torch.optim.AdamW(groups, **hp)


def lr_at(step: int, cfg: RunConfig, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to `optimizer.lr`
    over `schedule.warmup_steps`, then cosine to `lr * min_lr_ratio` at the last step."""
    base = cfg.optimizer.lr
    warmup = cfg.schedule.warmup_steps
    if step < warmup:
        return base * (step + 1) / warmup
    floor = base * cfg.schedule.min_lr_ratio
    span = max(1, total_steps - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: Any, lr: float) -> None:
    """Set every group's lr (DeepSpeed's wrappers share the client optimizer's groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
