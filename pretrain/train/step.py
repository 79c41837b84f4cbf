"""One optimizer step of CLIP training on a DeepSpeed engine: a function tests can call.

`train_step(engine, micro_batches, loss_fn)` runs forward + backward for each of the
step's `gradient_accumulation_steps` micro-batches and lets the engine step at the
boundary. Non-finite values are handled the same way at every ZeRO stage and precision:

- before each backward the "loss is finite" flag is all-reduced on the device (MAX of
  "bad"), so every rank knows when any rank's loss is NaN/Inf; then every rank
  backpropagates a NaN-scaled loss, which makes all gradients NaN on all ranks;
- the loss, the flag and the logit scale stay on the device: the step reads nothing back
  to the host until `finish_step`, which reads the step's figures back in one transfer, or
  with `defer=True` not at all (the trainer reads them back every `logging.every_steps`);
  the optimizer's own overflow check (DeepSpeed's ZeRO-1/2/3 optimizers, SkipNonFiniteAdamW
  under ZeRO-0) reads back its gradient norm inside `engine.step()` all the same;
- DeepSpeed's ZeRO-1/2/3 optimizers (all precisions) skip a step whose global gradient norm
  is not finite, and `SkipNonFiniteAdamW` does it for ZeRO-0 fp32; a gradient that turns
  non-finite with a finite loss is caught by the same check;
- `engine.was_step_applied()` then tells the caller whether the update happened.

The phases are labelled for torch.profiler (`step.forward`, `step.loss`, ...; see
benchmarks/profile_step.py); outside a profiler the labels cost microseconds. The step's
ending (boundary update, metrics) is `pretrain.engine_step.finish_step`, shared with the
gradient-cached step (pretrain/gradcache/engine.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.profiler import record_function

from pretrain.engine_step import PendingStep, StepOutput, any_rank_tensor, compute_dtype, finish_step

__all__ = ["StepOutput", "compute_dtype", "train_step"]


def train_step(engine, micro_batches: Sequence[dict], loss_fn: Callable[..., torch.Tensor], *,
               inject_nan: bool = False, defer: bool = False) -> StepOutput | PendingStep:
    """Forward/backward every micro-batch of one optimizer step, then the engine's update.

    `micro_batches`: dicts with "images" [b,3,S,S] float, "tokens" [b,ctx] long and
    optionally "skipped" (bad samples replaced in that batch). `inject_nan` makes this
    rank's first micro-batch loss NaN (the trainer's test hook). With `defer` the step reads
    nothing back and returns a PendingStep (pretrain.engine_step.read_back resolves it).
    """
    accum = engine.gradient_accumulation_steps()
    if len(micro_batches) != accum:
        raise ValueError(f"train_step got {len(micro_batches)} micro-batches; the engine accumulates {accum}")
    device, dtype = engine.device, compute_dtype(engine)
    # The step's figures stay on the device: no read-back to the host (which would wait for
    # the GPU to finish its queued work) until finish_step reads them all back at once.
    finite_sum = torch.zeros((), dtype=torch.float64, device=device)
    finite_n = torch.zeros((), dtype=torch.float64, device=device)
    any_bad = torch.zeros((), dtype=torch.bool, device=device)
    scale_value = torch.full((), float("nan"), device=device)
    nan = torch.full((), float("nan"), device=device)  # a fill, not a (blocking) host-to-device copy
    skipped = torch.zeros((), dtype=torch.float64)  # a host tensor: the loader's counts stay on the host
    last = len(micro_batches) - 1
    for i, batch in enumerate(micro_batches):
        images = batch["images"].to(device, dtype=dtype, non_blocking=True)
        tokens = batch["tokens"].to(device, non_blocking=True)
        skipped = skipped + torch.as_tensor(batch.get("skipped", 0), dtype=torch.float64).sum()  # no int(): no read-back
        # The model's outputs are the loss's arguments: (img, txt, scale) or, for a model
        # with a SigLIP logit bias, (img, txt, scale, bias); the captioning and bag-of-words
        # models (no temperature) give (logits, token targets) (pretrain/loss/__init__.py).
        with record_function("step.forward"):
            outputs = engine(images, tokens)
        with record_function("step.loss"):
            # The loss (over the global batch) is computed in fp32 whatever the precision;
            # integer outputs (token ids) pass unchanged.
            loss = loss_fn(*(t.float() if t.is_floating_point() else t for t in outputs))
        if inject_nan and i == 0:
            loss = loss * float("nan")
        with record_function("step.finite_check"):
            bad = any_rank_tensor(~torch.isfinite(loss.detach()))
            # Make every rank's gradients NaN when any rank's loss is not finite, so that
            # every optimizer skips this step alike (a multiplication by NaN, not a branch).
            loss = loss * torch.where(bad, nan, torch.ones_like(nan)).to(loss.dtype)
        any_bad = any_bad | bad
        finite_sum = finite_sum + torch.where(bad, torch.zeros_like(finite_sum), loss.detach().to(torch.float64))
        finite_n = finite_n + (~bad).to(torch.float64)
        if len(outputs) > 2:  # a contrastive model's temperature (the others log NaN)
            scale_value = outputs[2].detach().float().reshape(())
        with record_function("step.backward"):
            engine.backward(loss)
        if i < last:
            with record_function("step.optimizer"):  # not a boundary: advances the micro-step counter only
                engine.step()
    return finish_step(engine, finite_sum, finite_n, any_bad, scale_value, skipped, defer=defer)
