"""Peak memory per process of one DeepSpeed training step at global batches of 1k to 32k, with
and without exact gradient caching: 2 ranks, tiny CLIP (ViT-tiny, 32 px, 16-token context),
ZeRO-2, non-reentrant gradient checkpointing, tiled loss in both modes.

    .venv/bin/python benchmarks/bench_memory_32k.py [--sizes 1024 2048 ... 32768] [--chunk 1024]
        [--max-gib 6] [--no-grad-checkpointing] [--json out.json]

- cached: pretrain.gradcache, chunks of min(--chunk, local batch) samples = DeepSpeed
  micro-batches; every sample sees all global negatives;
- uncached: the trainer's own step (pretrain.train.step.train_step) with the whole local
  share as one micro-batch: the only uncached way to give every sample all global
  negatives (gradient accumulation would not).
Method: every (mode, size) runs in FRESH processes, started by the real `deepspeed` launcher
(2 ranks; benchmarks/gradcache_bigbatch.py). Each rank resets its kernel high-water mark
(VmHWM := VmRSS via /proc/self/clear_refs) after building the engine and its inputs, runs
one step, and reports VmHWM: the largest resident set of that process during the step,
everything resident included (interpreter, torch, model, optimizer, its inputs). Fresh
processes matter: freed memory stays in malloc's arenas and would inflate a later
measurement. On CUDA the worker reports torch.cuda.max_memory_allocated instead.
The uncached row stops before a size whose projected memory (linear in the batch, from the
last two measurements, summed over the ranks) exceeds --max-gib: the machine is shared.

Measured 2026-11-27, 2-core / 24 GiB CPU box shared with other jobs (step times are loose),
peak GiB per process (rank 0 / rank 1); "delta" = what the step added above the resident set
just before it (interpreter, torch, DeepSpeed, model, inputs: 0.55-0.9 GiB):

grad checkpointing on (default)           | grad checkpointing off (--no-grad-checkpointing)
batch  cached (delta)     uncached (delta) | cached (delta)     uncached (delta)
 1024  0.67/0.68 (0.13)   0.67/0.70 (0.16) | 0.77/0.75 (0.22)   0.74/0.77 (0.23)
 2048  0.80/0.80 (0.25)   0.80/0.79 (0.24) | 0.94/0.98 (0.42)   0.91/0.95 (0.39)
 4096  0.86/0.82 (0.29)   0.95/0.93 (0.37) | 1.01/1.02 (0.44)   1.25/1.26 (0.68)
 8192  0.89/0.87 (0.26)   1.35/1.46 (0.83) | 1.06/1.06 (0.44)   1.94/1.93 (1.32)
16384  0.96/0.95 (0.24)   1.88/1.90 (1.18) | 1.14/1.12 (0.42)   stopped (projected 6.6 GiB)
32768  1.14/1.09 (0.23)   2.91/2.92 (2.01) | 1.28/1.24 (0.38)   stopped
Cached: the step's own memory is flat (one chunk's activations); the slow growth of the
peak is the rank's inputs (16,384 images of 3x32x32 fp32 = 0.2 GiB at 32k). Uncached at 32k
needs 2.6x the cached peak with checkpointing; without it, the uncached rows stop at 8k.
Step times (printed in the table) ran 0.7x to 2.4x the uncached ones in these noisy runs;
the expected cost is one extra no-grad forward per chunk (about 1.3x).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout, uninstalled

from pretrain.train.distributed import free_port  # noqa: E402  (below the ephemeral range)

GIB = 1 << 30
RANKS = 2



def measure(size: int, cached: bool, chunk: int, checkpointing: bool) -> dict:
    """One fresh 2-rank launch; per-rank results of gradcache_bigbatch.py."""
    with tempfile.TemporaryDirectory(prefix="bench_mem_") as out:
        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(RANKS), "--master_port",
               str(free_port()), str(Path(__file__).resolve().with_name("gradcache_bigbatch.py")), "--out", out,
               "--global-batch", str(size),
               "--chunk", str(min(chunk, size // RANKS)), "--zero-stage", "2"]
        cmd += [] if cached else ["--uncached"]
        cmd += [] if checkpointing else ["--no-grad-checkpointing"]
        env = dict(os.environ)
        env.setdefault("DS_ACCELERATOR", "cpu")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            return {"error": f"rc {proc.returncode}: {(proc.stderr or proc.stdout)[-400:]}", "wall_s": wall}
        ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(RANKS)]
    return {"peak": [r["step_peak_bytes"] for r in ranks], "before": [r["rss_before_step_bytes"] for r in ranks],
            "step_s": max(r["step_s"] for r in ranks), "loss": ranks[0]["loss"], "wall_s": wall,
            "device": ranks[0]["device"]}


def projected_total(history: list[tuple[int, dict]], size: int) -> float | None:
    """Summed per-rank peak at `size`, extrapolated linearly from the last two sizes."""
    if len(history) < 2:
        return None
    (s0, m0), (s1, m1) = history[-2], history[-1]
    p0, p1 = sum(m0["peak"]), sum(m1["peak"])
    return p1 + (p1 - p0) * (size - s1) / (s1 - s0)


def fmt_peak(m: dict | None) -> str:
    if m is None:
        return "-"
    if "error" in m:
        return "failed"
    return " / ".join(f"{p / GIB:.2f}" for p in m["peak"])


def fmt_delta(m: dict | None) -> str:
    if m is None or "error" in m:
        return "-"
    return f"{max(p - b for p, b in zip(m['peak'], m['before'])) / GIB:.2f}"


def fmt_step(m: dict | None) -> str:
    return f"{m['step_s']:.1f}" if m is not None and "error" not in m else "-"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--max-gib", type=float, default=6.0, help="stop the uncached row above this projected total")
    p.add_argument("--no-grad-checkpointing", action="store_true")
    p.add_argument("--json", default="", help="also write the raw results here")
    args = p.parse_args()
    results: dict[str, dict[int, dict | None]] = {"cached": {}, "uncached": {}}
    notes: list[str] = []
    for mode in ("cached", "uncached"):
        history: list[tuple[int, dict]] = []
        stopped = False
        for size in args.sizes:
            proj = projected_total(history, size)
            if stopped or (proj is not None and proj > args.max_gib * GIB):
                if not stopped:
                    notes.append(f"{mode} stopped before {size}: projected {proj / GIB:.1f} GiB over {RANKS} ranks "
                                 f"> --max-gib {args.max_gib:g}")
                stopped = True
                results[mode][size] = None
                continue
            m = measure(size, mode == "cached", args.chunk, not args.no_grad_checkpointing)
            results[mode][size] = m
            print(f"{mode:8s} {size:6d}: peak/rank {fmt_peak(m)} GiB, step {m.get('step_s', float('nan')):.1f} s, "
                  f"launch {m['wall_s']:.0f} s", flush=True)
            if "error" in m:
                notes.append(f"{mode} {size}: {m['error']}")
                stopped = True
            else:
                history.append((size, m))

    print(f"\nPeak resident memory per process during one step (GiB, rank 0 / rank 1), {RANKS} ranks, ViT-tiny 32 px, "
          f"ctx 16, ZeRO-2, grad checkpointing {'off' if args.no_grad_checkpointing else 'on'}, chunks <= {args.chunk}")
    print("(step-delta: the largest rank's peak minus its resident set just before the step, i.e. what the step "
          "itself added)")
    print("| global batch | cached peak | cached step-delta | cached step s | uncached peak | uncached step-delta "
          "| uncached step s | uncached / cached peak |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        c, u = results["cached"].get(size), results["uncached"].get(size)
        ok = c is not None and u is not None and "error" not in c and "error" not in u
        ratio = f"{max(u['peak']) / max(c['peak']):.2f}x" if ok else "-"
        print(f"| {size} | {fmt_peak(c)} | {fmt_delta(c)} | {fmt_step(c)} | {fmt_peak(u)} | {fmt_delta(u)} "
              f"| {fmt_step(u)} | {ratio} |")
    for note in notes:
        print(f"note: {note}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "notes": notes}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
