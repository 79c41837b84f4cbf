"""What every optimizer step on a DeepSpeed engine shares: the plain step
(pretrain/train/step.py) and the gradient-cached step (pretrain/gradcache/engine.py).

    from pretrain.engine_step import finish_step
    ...forward/backward of the step's micro-batches, engine.step() after all but the last...
    out = finish_step(engine, finite_loss_sum, finite_count, nonfinite, logit_scale, skipped)
    # or, reading nothing back: pending = finish_step(..., defer=True); later read_back([pending, ...])

`finish_step` is the step's ending, written once: `engine.step()` at the accumulation
boundary (DeepSpeed clips the gradients to `gradient_clipping`, applies or skips the
update, and steps its learning-rate scheduler if it has one; the trainer instead sets the
step's learning rate before either step, pretrain.train.optim.set_lr), then whether the
update happened, the global gradient norm before clipping, and the loss and skipped-sample
counts summed over ranks. The phases are labelled for torch.profiler (`step.optimizer`, `step.stats`).

Imports nothing of the project: it sits below pretrain.gradcache and pretrain.train.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.profiler import record_function


@dataclass
class StepOutput:
    loss: float  # mean finite micro-batch loss over ranks and micro-batches (nan when none)
    loss_nonfinite: bool  # some rank's loss was NaN/Inf in this step (all ranks agree)
    applied: bool  # the optimizer update happened
    grad_norm: float | None  # global gradient norm before clipping (inf/nan when skipped)
    logit_scale: float  # exp(t) used by the last micro-batch's forward
    skipped_samples: int  # bad samples the loaders of all ranks skipped for this step


def compute_dtype(engine) -> torch.dtype:
    """The dtype DeepSpeed keeps the module in (inputs are cast to it)."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank (an all-reduce MAX; the flag
    itself outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def any_rank_tensor(flag: torch.Tensor) -> torch.Tensor:
    """`any_rank` kept on the device: a bool tensor, true on every rank when it is true on
    any rank (an all-reduce MAX), with no read-back to the host."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = flag.to(torch.float32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t[0] > 0


@dataclass
class PendingStep:
    """A step's figures still on the device (`finish_step(..., defer=True)`): `values` is a
    float64 tensor [loss sum, finite count, skipped samples, non-finite flag, logit scale,
    grad norm]; `applied` (and the norm, where the engine keeps it on the host) are already
    host values, read back by the optimizer itself. `read_back` turns many of them into
    StepOutputs with one transfer."""

    values: torch.Tensor
    applied: bool
    host_norm: float | None  # the norm when the engine returned a host number (else None)
    norm_on_device: bool

    def output(self, values: list[float]) -> StepOutput:
        total, n, skipped_all, bad, scale, dev_norm = values
        norm = dev_norm if self.norm_on_device else self.host_norm
        return StepOutput(loss=total / n if n else float("nan"), loss_nonfinite=bool(bad), applied=self.applied,
                          grad_norm=float(norm) if norm is not None else None, logit_scale=scale,
                          skipped_samples=int(skipped_all))


def read_back(pending: list[PendingStep]) -> list[StepOutput]:
    """The StepOutputs of deferred steps, in order, from one device-to-host transfer."""
    if not pending:
        return []
    rows = torch.stack([p.values for p in pending]).tolist()  # the window's one read-back
    return [p.output(row) for p, row in zip(pending, rows)]


def finish_step(engine, finite_loss_sum: float | torch.Tensor, finite_count: int | torch.Tensor,
                nonfinite: bool | torch.Tensor, logit_scale: float | torch.Tensor, skipped: int | torch.Tensor, *,
                defer: bool = False) -> StepOutput | PendingStep:
    """The step's ending, after the last micro-batch's backward: the engine's boundary step
    (clip, then update or skip), then the step's metrics over all ranks: a collective, every
    rank calls it.

    `finite_loss_sum` / `finite_count`: this rank's finite micro-batch losses and how many;
    `nonfinite`: the ranks agreed that the step's loss was not finite; `skipped`: bad samples
    this rank's loader replaced in the step. Each may be a host number or a 0-d device
    tensor: the metrics (and the gradient norm when the engine keeps it as a tensor) are
    gathered into one tensor and read back to the host once, in a single transfer; with
    `defer` not at all: a PendingStep is returned (the trainer reads a logging window's
    steps back together, `read_back`).
    """
    with record_function("step.optimizer"):
        engine.step()
    with record_function("step.stats"):
        # DeepSpeed's ZeRO optimizers (and SkipNonFiniteAdamW) read their overflow check back
        # to the host inside engine.step(): `applied` is a host bool already.
        applied = bool(engine.was_step_applied())
        norm = engine.get_global_grad_norm()
        device = engine.device

        def dev(x) -> torch.Tensor:
            # A host number becomes a device fill (no copy); a tensor moves without a blocking
            # copy: a blocking host-to-device copy would wait for the GPU's queued work.
            if isinstance(x, torch.Tensor):
                return x.to(device=device, dtype=torch.float64, non_blocking=True).reshape(())
            return torch.full((), float(x), dtype=torch.float64, device=device)

        summed = torch.stack([dev(finite_loss_sum), dev(finite_count), dev(skipped)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(summed)
        norm_on_device = isinstance(norm, torch.Tensor)
        local = torch.stack([dev(nonfinite), dev(logit_scale), dev(norm.detach()) if norm_on_device else dev(0.0)])
        pending = PendingStep(torch.cat([summed, local]), applied, None if norm_on_device else norm, norm_on_device)
    if defer:
        return pending
    return read_back([pending])[0]
