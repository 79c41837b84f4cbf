"""One DeepSpeed optimizer step of a tiny CLIP on a large synthetic global batch, cached
(gradient caching, chunks of `--chunk`) or uncached (the trainer's `train_step`, the whole
local share as one micro-batch): the per-rank worker behind scripts/gradcache_32k.py,
benchmarks/bench_memory_32k.py and tests/test_gradcache_ds.py (which puts benchmarks/ on
sys.path and imports it as `gradcache_bigbatch`).

    deepspeed --num_gpus 2 benchmarks/gradcache_bigbatch.py --global-batch 32768 \
        --chunk 1024 --out /tmp/gc32k [--uncached] [--save-grads] [--zero-stage 2]

Each rank writes `rank<r>.json` (loss, step time, memory); with --save-grads rank 0 also
writes `grads.pt`: every parameter's full reduced gradient, read at the accumulation
boundary before the update (deepspeed.utils.safe_get_full_grad). The optimizer is plain SGD
(no momentum, no weight decay), so the update is linear in the gradient: a gradient scaled
by a wrong factor cannot hide behind Adam's scale invariance.

Samples are a function of (seed, index) only (`make_samples`), so any process can rebuild
any slice of the global batch, e.g. a reference computed in another process.
Memory (per process): on CPU the kernel's resident-set high-water mark VmHWM, reset to the
current RSS (write 5 to /proc/self/clear_refs) just before the step, so `step_peak_rss`
is the largest resident set during the step, everything resident included (Python, torch,
model, optimizer, this rank's inputs); on CUDA torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from pretrain.config import RunConfig, from_dict  # noqa: E402
from pretrain.gradcache import gradcache_step  # noqa: E402
from pretrain.loss import get_loss  # noqa: E402
from pretrain.models import create_model  # noqa: E402
from pretrain.train.distributed import detect_env, finish, init  # noqa: E402
from pretrain.train.ds_config import build_ds_config  # noqa: E402
from pretrain.train.step import train_step  # noqa: E402

BLOCK = 256  # samples per generator block of make_samples


@dataclass
class BigBatchSpec:
    global_batch: int = 32768
    chunk: int = 1024  # cached: samples per chunk (= DeepSpeed micro-batch); ignored when uncached
    cached: bool = True
    model: str = "ViT-tiny"
    image_size: int = 32
    context_length: int = 16
    loss: str = "clip_tiled"
    zero_stage: int = 2
    grad_checkpointing: bool = True
    lr: float = 1.0
    seed: int = 0
    save_grads: bool = False

    def local_batch(self, world: int) -> int:
        if self.global_batch % world:
            raise ValueError(f"global batch {self.global_batch} is not divisible by world size {world}")
        local = self.global_batch // world
        if self.cached and local % self.chunk:
            raise ValueError(f"local batch {local} is not a multiple of chunk {self.chunk}")
        return local


def make_samples(start: int, stop: int, image_size: int, context_length: int, vocab: int,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [stop-start, 3, S, S] ~ N(0, 1) and token rows (random ids, end token last so
    the text tower's argmax pooling reads it) of samples start..stop-1 of the global batch."""
    images, tokens = [], []
    for block in range(start // BLOCK, (stop - 1) // BLOCK + 1):
        g = torch.Generator().manual_seed(seed * 1_000_003 + block)
        img = torch.randn(BLOCK, 3, image_size, image_size, generator=g)
        tok = torch.randint(1, vocab - 1, (BLOCK, context_length), generator=g)
        tok[:, -1] = vocab - 1
        lo, hi = max(start, block * BLOCK) - block * BLOCK, min(stop, (block + 1) * BLOCK) - block * BLOCK
        images.append(img[lo:hi])
        tokens.append(tok[lo:hi])
    return torch.cat(images), torch.cat(tokens)


def build_model(spec: BigBatchSpec) -> torch.nn.Module:
    torch.manual_seed(spec.seed)
    model = create_model(spec.model, image_size=spec.image_size, context_length=spec.context_length)
    model.set_grad_checkpointing(spec.grad_checkpointing)
    return model.train()


def run_config(spec: BigBatchSpec, world: int) -> RunConfig:
    """The spec as a run config, so the DeepSpeed JSON comes from the trainer's one builder:
    one optimizer step over the global batch, micro-batch = chunk (cached) or the whole local
    share (uncached), fp32, no clipping (the update stays linear in the gradient)."""
    local = spec.local_batch(world)
    micro = spec.chunk if spec.cached else local
    return from_dict(RunConfig, {
        "output_dir": "unused",  # the benchmark writes no run dir
        "model": {"name": spec.model},
        "data": {"sources": ["unused.tar"], "samples_per_epoch": spec.global_batch},  # synthetic samples
        "schedule": {"warmup_steps": 0},
        "train": {"global_batch": spec.global_batch, "micro_batch": micro, "max_steps": 1,
                  "zero_stage": spec.zero_stage, "precision": "fp32", "grad_clip": 0.0,
                  "loss": spec.loss, "grad_cache": spec.cached, "seed": spec.seed}})


def ds_config(spec: BigBatchSpec, world: int) -> dict[str, Any]:
    return build_ds_config(run_config(spec, world), world)


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_rank(spec: BigBatchSpec) -> dict[str, Any]:
    """One optimizer step on this rank (process group already up, or a single process).
    Returns the measurements; with `save_grads`, also "grads" (rank 0) and "params" (after
    the step, rank 0)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    local = spec.local_batch(world)
    cuda = torch.cuda.is_available()
    model = build_model(spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(spec, world))
    loss_fn = get_loss(spec.loss)
    rss_init = _status_bytes("VmRSS")
    images, tokens = make_samples(rank * local, (rank + 1) * local, spec.image_size, spec.context_length,
                                  engine.module.vocab_size, spec.seed)
    grads: dict[str, torch.Tensor] = {}

    def read_grads() -> None:  # collective under ZeRO: every rank calls it
        for name, p in engine.module.named_parameters():
            g = safe_get_full_grad(p)
            if rank == 0:
                grads[name] = g.detach().float().cpu().clone()

    rss_before = _status_bytes("VmRSS")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the step's own peak follows
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    if spec.cached:
        out = gradcache_step(engine, images, tokens, loss_fn, spec.chunk,
                             on_boundary=read_grads if spec.save_grads else None)
    else:
        out = train_step(engine, [{"images": images, "tokens": tokens}], loss_fn)
    if cuda:
        torch.cuda.synchronize()
    step_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")
    result: dict[str, Any] = {
        "rank": rank, "world_size": world, "spec": asdict(spec), "local_batch": local,
        "loss": out.loss, "applied": out.applied, "grad_norm": out.grad_norm, "step_s": step_s,
        "replay_max_diff": getattr(out, "replay_max_diff", None), "device": "cuda" if cuda else "cpu",
        "rss_init_bytes": rss_init, "rss_before_step_bytes": rss_before, "step_peak_bytes": peak,
        "threads": torch.get_num_threads(),
    }
    if spec.save_grads:
        params = {}
        for name, p in engine.module.named_parameters():
            full = safe_get_full_fp32_param(p)  # collective under ZeRO; None at ZeRO-0 (no master copy)
            params[name] = (full if full is not None else p).detach().float().cpu().clone()
        if rank == 0:
            result["grads"], result["params"] = grads, params
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for rank<r>.json (and grads.pt)")
    p.add_argument("--global-batch", type=int, default=32768)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--uncached", action="store_true", help="the trainer's plain step, one micro-batch per rank")
    p.add_argument("--model", default="ViT-tiny")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--context-length", type=int, default=16)
    p.add_argument("--loss", default="clip_tiled")
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--no-grad-checkpointing", action="store_true")
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-grads", action="store_true")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    a = p.parse_args(argv)
    spec = BigBatchSpec(global_batch=a.global_batch, chunk=a.chunk, cached=not a.uncached, model=a.model,
                        image_size=a.image_size, context_length=a.context_length, loss=a.loss,
                        zero_stage=a.zero_stage, grad_checkpointing=not a.no_grad_checkpointing, lr=a.lr,
                        seed=a.seed, save_grads=a.save_grads)
    env = detect_env(a.local_rank)
    if not torch.cuda.is_available():
        # ranks share the host's cores: one share each, no oversubscription
        local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    init(env, timeout_s=3600)
    result = run_rank(spec)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    grads, params = result.pop("grads", None), result.pop("params", None)
    if grads is not None:
        torch.save({"grads": grads, "params": params}, out / "grads.pt")
    (out / f"rank{env.rank}.json").write_text(json.dumps(result, indent=1))
    finish(0)


if __name__ == "__main__":
    main()
