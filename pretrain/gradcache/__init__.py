"""Exact gradient caching for CLIP: global batches larger than fit in memory, with every
sample seeing all global negatives and gradients equal to the uncached computation.

    from pretrain.gradcache import gradcache_backward, gradcache_train_step
    loss = gradcache_backward(model, images, tokens, loss_fn, chunk=1024)   # plain module
    out = gradcache_train_step(engine, micro_batches, loss_fn)             # DeepSpeed engine

core.py holds the algorithm, replay.py what makes the second forward identical to the
first (RNG state, BatchNorm buffers), plain.py and engine.py the two wrappers; the step's
ending is shared with the plain trainer step (pretrain.engine_step.finish_step). The 32k
check and the memory benchmark (scripts/gradcache_32k.py, benchmarks/bench_memory_32k.py)
run benchmarks/gradcache_bigbatch.py per rank and compare with the independent float64
reference gradient of benchmarks/gradcache_reference.py.
Run the tests: `.venv/bin/python -m pytest -q tests/test_gradcache.py tests/test_gradcache_ds.py`.
"""

from __future__ import annotations

from pretrain.gradcache.core import (Chunk, FeatureCache, FeatureGrads, embed_chunks, feature_grads,
                                     replay_backward, split_batch, surrogate)
from pretrain.gradcache.engine import GradCacheStepOutput, check_engine, gradcache_step, gradcache_train_step
from pretrain.gradcache.plain import gradcache_backward
from pretrain.gradcache.replay import RngState, preserved_buffers

__all__ = [
    "Chunk",
    "FeatureCache",
    "FeatureGrads",
    "GradCacheStepOutput",
    "RngState",
    "check_engine",
    "embed_chunks",
    "feature_grads",
    "gradcache_backward",
    "gradcache_step",
    "gradcache_train_step",
    "preserved_buffers",
    "replay_backward",
    "split_batch",
    "surrogate",
]
