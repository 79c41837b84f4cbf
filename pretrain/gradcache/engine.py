"""Gradient caching on a DeepSpeed engine (ZeRO 0-3): one optimizer step.

    from pretrain.gradcache import gradcache_train_step
    out = gradcache_train_step(engine, micro_batches, loss_fn)      # drop-in for train_step

The step's micro-batches (one rank's share of the global batch, as the trainer's loader
yields them) are the cache chunks: every sample sees the whole global batch as negatives,
and only one micro-batch's activations are alive at a time.

How it meets DeepSpeed:
- each chunk's pass-2 backward is ONE engine micro-step: `engine.backward(surrogate)` then
  `engine.step()`, which only advances the micro-step counter until the last chunk. A
  parameter's ZeRO-2 reduce hook therefore fires once per micro-step, never twice ("Gradient
  computed twice for this partition", DeepSpeed issue #988); pass 1 runs under
  no_grad and the loss's backward only reaches detached features, so no hook fires there.
  The engine's `gradient_accumulation_steps` must equal the number of chunks (in the
  trainer: chunk = train.micro_batch), so that ZeRO reduces and steps at the last chunk;
- `engine.backward` divides the loss by gradient_accumulation_steps by default (the right
  thing when each micro-batch's loss is a mean over that micro-batch). Here the cached
  gradients are already those of the whole share's loss, so the surrogate is passed with
  `scale_wrt_gas=False`: no division at all, rather than a division compensated by a
  multiplication that rounds (open_clip's accum-freq scaling bug, #761/#957, in another
  guise). The engine's output hooks also skip their 1/GAS rescale for graphs that
  engine.backward registered. fp16 loss scaling still applies (the engine does it);
- DeepSpeed averages parameter gradients over ranks, which with the losses' all-gather
  convention gives the single-process full-global-batch gradient (pretrain.loss).
Non-finite losses are handled as in pretrain/train/step.py, and the step ends the same way
(`pretrain.engine_step.finish_step`: boundary update, metrics): all ranks agree, the cached
gradients become NaN on every rank, and the optimizer skips the update.
ZeRO-3 works as well (tested): it gathers each layer's parameters in pass 1 and again in
pass 2, one more gather per chunk than an uncached micro-batch.

Run the tests: `.venv/bin/python -m pytest -q tests/test_gradcache_ds.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from pretrain.engine_step import StepOutput, any_rank, compute_dtype, finish_step
from pretrain.gradcache.core import Chunk, LossFn, embed_chunks, feature_grads, replay_backward, split_batch


@dataclass
class GradCacheStepOutput(StepOutput):
    replay_max_diff: float  # max |pass-2 - pass-1 features| on this rank (0 on CPU: see core.py)


def check_engine(engine, n_chunks: int) -> None:
    """Raise a clear error unless `engine` can run a cached step of `n_chunks` chunks."""
    accum = engine.gradient_accumulation_steps()
    if accum != n_chunks:
        raise ValueError(f"gradient caching got {n_chunks} chunks but the engine accumulates {accum} micro-steps: "
                         "make the number of chunks per rank the engine's gradient_accumulation_steps "
                         "(chunk size = train_micro_batch_size_per_gpu)")
    if engine.micro_steps % accum != 0:
        raise RuntimeError(f"the engine is {engine.micro_steps % accum} micro-step(s) into an accumulation cycle; "
                           "a cached step must start at a step boundary (was engine.step() skipped?)")


def gradcache_train_step(engine, micro_batches: Sequence[dict], loss_fn: LossFn, *, inject_nan: bool = False,
                         on_boundary: Callable[[], None] | None = None) -> GradCacheStepOutput:
    """One optimizer step over this rank's micro-batches with exact gradient caching.

    `micro_batches`: dicts with "images" [b,3,S,S], "tokens" [b,ctx] and optionally
    "skipped" (as pretrain.train.step.train_step); their number must equal the engine's
    gradient_accumulation_steps. `inject_nan` makes this rank's loss NaN (test hook).
    `on_boundary` is called after the last backward and before the update, when the reduced
    gradients are readable (e.g. with deepspeed.utils.safe_get_full_grad).
    """
    chunks = [Chunk(b["images"], b["tokens"]) for b in micro_batches]
    check_engine(engine, len(chunks))
    device, dtype = engine.device, compute_dtype(engine)
    skipped = sum(int(b.get("skipped", 0)) for b in micro_batches)
    last = len(chunks) - 1

    def forward(images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Chunks move to the device one at a time: the whole share may only fit on the host.
        return engine(images.to(device, dtype=dtype, non_blocking=True), tokens.to(device, non_blocking=True))

    def backward(surrogate: torch.Tensor, k: int) -> None:
        if engine.is_gradient_accumulation_boundary() != (k == last):
            raise RuntimeError(f"chunk {k} of {last + 1}: the engine's micro-step counter is out of phase with the "
                               "cached step (was engine.step() called elsewhere between steps?)")
        engine.backward(surrogate, scale_wrt_gas=False)
        if k < last:
            engine.step()  # not a boundary: advances the micro-step counter only

    cache = embed_chunks(forward, chunks, device)
    grads = feature_grads(cache, loss_fn)
    loss = grads.loss * float("nan") if inject_nan else grads.loss
    bad = any_rank(not bool(torch.isfinite(loss).item()), device)
    if bad:
        # NaN gradients on every rank: every ZeRO optimizer (and SkipNonFiniteAdamW) skips alike.
        nan = float("nan")
        grads.image, grads.text, grads.logit_scale = grads.image * nan, grads.text * nan, grads.logit_scale * nan
    diff = replay_backward(forward, chunks, cache, grads, backward, engine.module)
    if on_boundary is not None:
        on_boundary()
    out = finish_step(engine, 0.0 if bad else float(loss), 0 if bad else 1, bad, float(cache.logit_scale), skipped)
    return GradCacheStepOutput(**asdict(out), replay_max_diff=diff)


def gradcache_step(engine, images: torch.Tensor, tokens: torch.Tensor, loss_fn: LossFn, chunk: int,
                   **kwargs) -> GradCacheStepOutput:
    """`gradcache_train_step` on one tensor pair cut into chunks of `chunk` samples."""
    parts = split_batch(images, tokens, chunk)
    return gradcache_train_step(engine, [{"images": c.images, "tokens": c.tokens} for c in parts], loss_fn, **kwargs)
