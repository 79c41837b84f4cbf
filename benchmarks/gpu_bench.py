"""GPU benchmark, one prepared script: training samples/s and model FLOPs utilisation (MFU)
of ViT-B/32 and RN50 at batch 256 in bf16 with and without gradient checkpointing, and the
largest micro-batch of ViT-L/14 that fits, without and with gradient caching.

    .venv/bin/python benchmarks/gpu_bench.py                 # on one GPU (~5-10 min on an H100)
    .venv/bin/python benchmarks/gpu_bench.py --dry-run       # CPU: tiny models, checks the logic
        [--batch 256] [--steps 10] [--warmup 3] [--peak-tflops 989] [--search-cap 4096]
        [--only throughput|largest] [--points 2048,4096 --cache-points 8192]

Every measurement runs the project's real training path in a fresh child process (so one
OOM or one allocator state never leaks into the next row): the run config
(`pretrain.config`), the DeepSpeed engine (`pretrain.train.build.build_engine`, ZeRO-1, bf16),
and the optimizer step (`pretrain.train.step.train_step`, or the cached step), on one
device. Throughput rows use the "clip" loss on synthetic inputs already on the device, so
the numbers are the model's, not the input pipeline's.

MFU = samples/s x (3 x forward FLOPs per sample) / peak FLOP/s. Forward FLOPs are counted
by `torch.utils.flop_counter.FlopCounterMode` on the real model (matmuls, convolutions,
attention; 2 FLOPs per multiply-add); the factor 3 is forward + backward, and recomputation
under gradient checkpointing is NOT counted (the usual model-FLOPs convention), so
checkpointing shows as a lower MFU. Peak: --peak-tflops, or the bf16 dense peak of a known
device name (H100/H200 989, A100 312); unknown -> MFU not printed.

Largest batch of ViT-L/14 (gradient checkpointing on, as the paper trains it; the tiled loss
so that the loss never sets the limit; inputs on the host as the loader yields them):
- without caching: the largest micro-batch for one optimizer step, doubling until a CUDA
  OOM, then bisecting to --granularity;
- with caching (`pretrain.gradcache.gradcache_train_step`, chunks of --cache-chunk): the
  largest per-device global batch, doubling/bisecting in chunks up to --cache-cap; with
  caching only the features and the chunk's activations grow, so time rather than memory
  usually stops this search (then the cap is printed as ">= cap"). Skipped with a message
  where pretrain.gradcache is absent.
With --points (and --cache-points) the searches are replaced by one probe per listed batch,
for a short device lease. With --dry-run everything runs on CPU with ViT-tiny / RN-tiny, batch 8, 2 steps and caps
of 16 (CPU never runs out of memory, so the searches stop at the caps).
Expected time on one H100: ~2 min throughput, ~5-10 min for the two searches
(`--only throughput|largest` runs one part). The cached rows also set `train.grad_cache=true`
where the run config has it, as a training run would.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from _common import machine_line, md_table, run_child  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
EOT = 49407  # end-of-text id: the text tower pools at the highest id


# ----------------------------------------------------------------------- child side ---
def gradcache_step() -> Callable[..., Any] | None:
    """The project's gradient-caching step (`pretrain.gradcache.gradcache_train_step`, a
    drop-in for train_step), or None where this checkout has none."""
    try:
        from pretrain.gradcache import gradcache_train_step  # noqa: PLC0415
    except ImportError:
        return None
    return gradcache_train_step


@dataclass
class Bench:
    """What one measurement runs: the engine and one optimizer step's inputs."""
    engine: Any
    micro_batches: list[dict[str, Any]]
    loss_fn: Callable[..., Any]
    step_fn: Callable[..., Any]
    device: Any
    fwd_flops_per_sample: float


def bench_config(spec: dict[str, Any]):
    """The trainer's typed run config for `spec` (raises on a bad `extra` override). Cheap:
    no engine, no process group, so a caller can check its overrides before any child runs."""
    from pretrain.config import load_config  # noqa: PLC0415

    total = spec["global_batch"]
    overrides = [f"--output_dir={spec['out_dir']}", f"--model.name={spec['model']}",
                 f"--model.grad_checkpointing={str(spec['ckpt']).lower()}",
                 f"--train.precision={spec['precision']}", "--train.zero_stage=1",
                 f"--train.global_batch={total}", f"--train.micro_batch={spec['micro_batch']}",
                 "--data.sources=unused.tar", f"--data.samples_per_epoch={total * 1000}",
                 "--logging.mlflow=false"] + spec.get("extra", [])
    return load_config(None, overrides)


def build_bench(spec: dict[str, Any]) -> Bench:
    """In this process: the trainer's run config, backend settings and DeepSpeed engine
    (ZeRO-1) for `spec`, and synthetic inputs for one optimizer step. Also used by
    profile_step.py."""
    import torch  # noqa: PLC0415
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    from pretrain.loss import get_loss  # noqa: PLC0415
    from pretrain.train import distributed  # noqa: PLC0415
    from pretrain.train.backends import configure_backends  # noqa: PLC0415
    from pretrain.train.build import build_engine  # noqa: PLC0415
    from pretrain.train.step import train_step  # noqa: PLC0415

    env = distributed.detect_env()
    device = distributed.init(env, 600)
    micro, total = spec["micro_batch"], spec["global_batch"]
    cfg = bench_config(spec)
    configure_backends(cfg.train, device)  # as the trainer does (cuDNN benchmark mode on CUDA)
    engine, _ = build_engine(cfg, 1)
    model = engine.module
    dtype = next(model.parameters()).dtype
    gen = torch.Generator(device="cpu").manual_seed(0)

    def batch(n: int, where: Any = device) -> dict[str, torch.Tensor]:
        images = torch.randn(n, 3, model.image_size, model.image_size, generator=gen)
        tokens = torch.randint(1, EOT - 1, (n, model.context_length), generator=gen)
        tokens[:, -1] = EOT
        return {"images": images.to(where, dtype), "tokens": tokens.to(where)}

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        probe = batch(2)
        model(probe["images"], probe["tokens"])
    fwd_flops = counter.get_total_flops() / 2
    # Throughput rows keep the inputs on the device (the model's speed, not the copy's);
    # largest-batch rows keep them on the host as the trainer's loader does (train_step and
    # the cached step move one micro-batch at a time), so inputs never count against memory.
    host = spec.get("inputs_on_host", False)
    micro_batches = [batch(micro, "cpu" if host else device) for _ in range(total // micro)]
    step_fn = gradcache_step() if spec.get("gradcache") else train_step
    if step_fn is None:
        raise RuntimeError("gradient caching asked for, but pretrain.gradcache is missing")
    return Bench(engine, micro_batches, get_loss(spec.get("loss", "clip")), step_fn, device, fwd_flops)


def child_run(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process: build the engine, run steps, report."""
    import time  # noqa: PLC0415

    import torch  # noqa: PLC0415

    b = build_bench(spec)
    cuda = b.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out: dict[str, Any] = {"fwd_flops_per_sample": b.fwd_flops_per_sample}
    try:
        for _ in range(spec["warmup"]):
            b.step_fn(b.engine, b.micro_batches, b.loss_fn)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(spec["steps"]):
            step = b.step_fn(b.engine, b.micro_batches, b.loss_fn)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        out.update(fits=True, samples_per_s=spec["steps"] * spec["global_batch"] / elapsed, loss=step.loss,
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
    except torch.cuda.OutOfMemoryError:
        out.update(fits=False)
    return out


# ---------------------------------------------------------------------- parent side ---
def trainer_has_grad_cache() -> bool:
    """Whether the run config has the `train.grad_cache` switch (set it too, as a run would)."""
    from pretrain.config.schema import TrainConfig  # noqa: PLC0415

    return "grad_cache" in TrainConfig.__dataclass_fields__


def largest_fitting(fits: Callable[[int], bool], start: int, cap: int, granularity: int) -> tuple[int, bool]:
    """(largest b in [start, cap] with fits(b), hit_cap): doubling, then bisection down to
    `granularity`. Returns (0, False) when even `start` does not fit."""
    if not fits(start):
        return 0, False
    lo = start
    while lo * 2 <= cap and fits(lo * 2):
        lo *= 2
    if lo * 2 > cap:
        return lo, True
    hi = lo * 2  # lo fits, hi does not
    while hi - lo > granularity:
        mid = (lo + hi) // 2 // granularity * granularity or lo + granularity
        if mid <= lo or mid >= hi:
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, False


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    return run_child([sys.executable, __file__, "--child", json.dumps(spec)], timeout=1800)


def peak_flops(args: argparse.Namespace, device_name: str) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


def throughput_rows(args: argparse.Namespace, models: tuple[str, str], device_name: str) -> list[list[Any]]:
    rows = []
    peak = peak_flops(args, device_name)
    for model in models:
        for ckpt in (False, True):
            spec = {"model": model, "ckpt": ckpt, "precision": args.precision, "micro_batch": args.batch,
                    "global_batch": args.batch, "steps": args.steps, "warmup": args.warmup,
                    "out_dir": args.out_dir}
            r = run_spec(spec)
            if not r["fits"]:
                rows.append([model, args.batch, "on" if ckpt else "off", "OOM", "-", "-", "-"])
                continue
            train_flops = 3 * r["fwd_flops_per_sample"]
            mfu = f"{100 * r['samples_per_s'] * train_flops / peak:.1f}%" if peak else "- (peak unknown)"
            rows.append([model, args.batch, "on" if ckpt else "off", f"{r['samples_per_s']:.1f}",
                         f"{train_flops / 1e9:.1f}", mfu, f"{r['peak_gib']:.1f}" if r["peak_gib"] else "-"])
            print(md_table(THROUGHPUT_HEADERS, [rows[-1]]).splitlines()[-1], flush=True)
    return rows


def probe_rows(args: argparse.Namespace, model: str, base: dict[str, Any]) -> list[list[Any]]:
    """One row per probed batch: does one optimizer step fit, its samples/s and peak memory.
    --points: micro-batches without caching; --cache-points: per-device batches with caching."""
    rows = []
    for cached, points in ((False, args.points), (True, args.cache_points)):
        for b in (int(x) for x in points.split(",") if x):
            spec = {**base, "micro_batch": b, "global_batch": b}
            if cached:
                spec.update(micro_batch=args.cache_chunk, gradcache=True,
                            extra=["--train.grad_cache=true"] if trainer_has_grad_cache() else [])
            r = run_spec(spec)
            rows.append([model, f"on (chunk {args.cache_chunk})" if cached else "off", b,
                         "OOM" if not r["fits"] else f"{r['samples_per_s']:.1f}",
                         f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "-"])
            print(md_table(PROBE_HEADERS, [rows[-1]]).splitlines()[-1], flush=True)
    return rows


THROUGHPUT_HEADERS = ["model", "batch", "grad ckpt", "samples/s", "train GFLOP/sample", "MFU", "peak GiB"]
LARGEST_HEADERS = ["model", "gradient caching", "largest micro-batch that fits", "note"]
PROBE_HEADERS = ["model", "gradient caching", "batch", "samples/s (one step)", "peak GiB"]


def largest_rows(args: argparse.Namespace, model: str) -> list[list[Any]]:
    # One step is enough to know whether it fits; gradient checkpointing on (the paper's
    # ViT-L/14 setting); the tiled loss, so the loss itself never sets the limit.
    base = {"model": model, "ckpt": True, "precision": args.precision, "steps": 1, "warmup": 0,
            "out_dir": args.out_dir, "inputs_on_host": True, "loss": "clip_tiled"}

    def fits_plain(b: int) -> bool:
        return bool(run_spec({**base, "micro_batch": b, "global_batch": b})["fits"])

    if args.points:  # fixed probes instead of the search (a short device lease)
        return probe_rows(args, model, base)
    b, capped = largest_fitting(fits_plain, args.search_start, args.search_cap, args.granularity)
    rows = [[model, "off", f">= {b}" if capped else b,
             "search stopped at --search-cap" if capped else "micro-batch = per-device batch; grad ckpt on"]]
    if gradcache_step() is None:
        rows.append([model, "on", "skipped", "pretrain.gradcache (gradient caching) is not in this checkout"])
    else:
        # Caching: chunks of --cache-chunk; the per-device global batch b sees all of itself.
        def fits_cached(b: int) -> bool:
            spec = {**base, "micro_batch": args.cache_chunk, "global_batch": b, "gradcache": True,
                    "extra": ["--train.grad_cache=true"] if trainer_has_grad_cache() else []}
            return bool(run_spec(spec)["fits"])

        b, capped = largest_fitting(fits_cached, args.cache_chunk * 2, args.cache_cap, args.cache_chunk)
        rows.append([model, f"on (chunk {args.cache_chunk})", f">= {b}" if capped else b,
                     ("search stopped at --cache-cap (time, not memory, bounds it)" if capped else
                      "per-device global batch, in chunks; grad ckpt on")])
    for r in rows:
        print(md_table(LARGEST_HEADERS, [r]).splitlines()[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models: check syntax and logic")
    ap.add_argument("--batch", type=int, default=None, help="throughput batch (default 256; dry run 8)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; dry run 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; dry run 1)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    ap.add_argument("--search-start", type=int, default=None, help="first micro-batch tried (default 64; dry 2)")
    ap.add_argument("--search-cap", type=int, default=None, help="largest micro-batch tried (default 4096; dry 16)")
    ap.add_argument("--granularity", type=int, default=None, help="bisection step (default 16; dry 2)")
    ap.add_argument("--cache-chunk", type=int, default=None, help="chunk with caching (default 256; dry 4)")
    ap.add_argument("--cache-cap", type=int, default=None,
                    help="largest per-device batch tried with caching (default 32768; dry 16)")
    ap.add_argument("--points", default="",
                    help="probe these micro-batches (comma list) instead of searching; with --cache-points")
    ap.add_argument("--cache-points", default="", help="per-device batches probed with caching (with --points)")
    ap.add_argument("--only", choices=["throughput", "largest"], default=None)
    ap.add_argument("--out-dir", default="/tmp/gpu_bench_run")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child_run(json.loads(args.child))))
        sys.stdout.flush()
        from pretrain.train import distributed  # noqa: PLC0415

        distributed.finish(0)  # barrier-free single rank: clean gloo/NCCL teardown, then exit

    import torch  # noqa: PLC0415

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU, or pass --dry-run to check the script on CPU")
    defaults = dict(batch=8, steps=2, warmup=1, search_start=2, search_cap=16, granularity=2, cache_chunk=4,
                    cache_cap=16) if dry \
        else dict(batch=256, steps=10, warmup=3, search_start=64, search_cap=4096, granularity=16, cache_chunk=256,
                    cache_cap=32768)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not dry else "cpu"
    models = ("ViT-tiny", "RN-tiny") if dry else ("ViT-B/32", "RN50")
    big = "ViT-tiny" if dry else "ViT-L/14"
    print(machine_line("cuda" if device_name != "cpu" else "cpu") + (" (DRY RUN: tiny models)" if dry else ""))
    if args.only in (None, "throughput"):
        print(f"# training throughput, {args.precision}, ZeRO-1, 1 device, {args.warmup} warm-up + {args.steps} steps")
        print(md_table(THROUGHPUT_HEADERS, throughput_rows(args, models, device_name)))
    if args.only in (None, "largest"):
        print(f"# largest micro-batch, {args.precision}, ZeRO-1, 1 device")
        print(md_table(PROBE_HEADERS if args.points else LARGEST_HEADERS, largest_rows(args, big)))


if __name__ == "__main__":
    main()
