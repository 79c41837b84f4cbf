"""Where the time of one training step goes: torch.profiler over the trainer's real step.

    .venv/bin/python benchmarks/profile_step.py                          # one GPU: ViT-B/32, batch 256, bf16
    .venv/bin/python benchmarks/profile_step.py --model RN50 --ckpt
    .venv/bin/python benchmarks/profile_step.py --dry-run                # CPU, ViT-tiny: checks the script
        [--batch 256] [--micro-batch N] [--warmup 3] [--steps 5] [--precision bf16] [--top 25]
        [--fast] [--override KEY=VALUE ...]   # fastest step switches; run-config overrides (model.*)

Same set-up as gpu_bench.py's throughput rows (`gpu_bench.build_bench`: run config, backend
settings, DeepSpeed ZeRO-1 engine, `train_step`, synthetic inputs on the device), in this
process. After the warm-up steps, `--steps` steps run under torch.profiler and it prints:

- wall time per step, and on CUDA the device-busy fraction: the time during which any GPU
  kernel or copy ran, over the wall time. A low fraction means the step is bound by host
  work (Python, kernel launches, synchronisations), not by the GPU;
- host time per phase of the step (the `step.*` labels of pretrain/train/step.py: forward,
  loss, finite check, backward, optimizer, stats);
- the top kernels and copies by device time (CUDA), or operators by CPU time (CPU), with
  call counts;
- a Chrome trace (open in chrome://tracing or https://ui.perfetto.dev) under --out-dir.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from _common import machine_line, md_table  # noqa: E402
from gpu_bench import build_bench  # noqa: E402

PHASES = ("step.forward", "step.loss", "step.finite_check", "step.backward", "step.optimizer", "step.stats")


def _device_us(evt: Any, self_only: bool) -> float:
    """Device time of a profiler event average, in microseconds, across torch versions."""
    names = ("self_device_time_total", "self_cuda_time_total") if self_only else \
        ("device_time_total", "cuda_time_total")
    for name in names:
        if hasattr(evt, name):
            return float(getattr(evt, name))
    return 0.0


def device_busy_us(prof: Any) -> float:
    """Time during which the device ran anything (kernels, memcpy, memset), in microseconds:
    the union of the device events' intervals, so that kernels overlapping on two streams
    (NCCL beside compute) count once. The `step.*` labels also appear on the device timeline
    as user annotations spanning their kernels; they are left out."""
    from torch.autograd import DeviceType  # noqa: PLC0415

    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
    return union_length(spans)


def union_length(spans: list[tuple[float, float]]) -> float:
    """Total length covered by sorted (start, end) intervals."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in spans:
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return float(total)


def phase_rows(prof: Any, steps: int) -> list[list[Any]]:
    """Host time per step of each labelled phase (inclusive: what the CPU spent inside it)."""
    by_key = {e.key: e for e in prof.key_averages()}
    rows = []
    for name in PHASES:
        e = by_key.get(name)
        if e is not None:
            rows.append([name, e.count // steps, f"{e.cpu_time_total / 1e3 / steps:.2f}"])
    return rows


def top_rows(prof: Any, cuda: bool, top: int, steps: int) -> list[list[Any]]:
    """On CUDA the kernels and copies that take most device time; on CPU the operators that
    take most CPU time. The `step.*` labels and profiler steps are left out."""
    from torch.autograd import DeviceType  # noqa: PLC0415

    events = [e for e in prof.key_averages() if not e.key.startswith(("step.", "ProfilerStep"))]
    if cuda:
        events = sorted((e for e in events if e.device_type == DeviceType.CUDA),
                        key=lambda e: _device_us(e, True), reverse=True)
        return [[e.key[:80], e.count // steps, f"{_device_us(e, True) / 1e3 / steps:.2f}"] for e in events[:top]]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [[e.key[:80], e.count // steps, f"{e.self_cpu_time_total / 1e3 / steps:.2f}"] for e in events[:top]]


# The trainer-step switches of the fastest configuration (pretrain/train/README.md); the
# model-side ones (model.*) are given with --override.
FAST_OVERRIDES = ["optimizer.kernel=fused", "train.cudnn_benchmark=true"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, ViT-tiny, batch 8: checks the script")
    ap.add_argument("--model", default=None, help="model name (default ViT-B/32; dry run ViT-tiny)")
    ap.add_argument("--batch", type=int, default=None, help="global batch of one device (default 256; dry 8)")
    ap.add_argument("--micro-batch", type=int, default=None, help="micro-batch (default: the batch)")
    ap.add_argument("--ckpt", action="store_true", help="gradient checkpointing on")
    ap.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"],
                    help="default bf16 (dry run fp32)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="profiled steps")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out-dir", default="/tmp/profile_step")
    ap.add_argument("--fast", action="store_true",
                    help=f"the fastest trainer-step switches on: {' '.join(FAST_OVERRIDES)}")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="run-config override passed through (repeatable), e.g. model.compile=blocks")
    args = ap.parse_args()

    import torch  # noqa: PLC0415
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU, or pass --dry-run to check the script on CPU")
    model = args.model or ("ViT-tiny" if dry else "ViT-B/32")
    batch = args.batch or (8 if dry else 256)
    spec = {"model": model, "ckpt": args.ckpt, "precision": args.precision or ("fp32" if dry else "bf16"),
            "micro_batch": args.micro_batch or batch, "global_batch": batch, "out_dir": args.out_dir}
    overrides = (FAST_OVERRIDES if args.fast else []) + [o.removeprefix("--") for o in args.override]
    spec["extra"] = [f"--{o}" for o in overrides]
    b = build_bench(spec)
    cuda = b.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        b.step_fn(b.engine, b.micro_batches, b.loss_fn)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            b.step_fn(b.engine, b.micro_batches, b.loss_fn)
        sync()
        wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))

    print(machine_line("cuda" if cuda else "cpu") + (" (DRY RUN: tiny model)" if dry else ""))
    print(f"# {model}, batch {batch} (micro-batch {spec['micro_batch']}), {spec['precision']}, "
          f"grad ckpt {'on' if args.ckpt else 'off'}, ZeRO-1, {args.warmup} warm-up + {args.steps} profiled steps")
    print(f"# overrides: {' '.join(overrides) or 'none'}")
    line = f"wall {wall_ms:.1f} ms/step ({batch / wall_ms * 1e3:.1f} samples/s under the profiler)"
    if cuda:
        busy = device_busy_us(prof) / 1e3 / args.steps
        line += (f"; device busy {busy:.1f} ms/step = {100 * busy / wall_ms:.0f}% of wall" if busy > 0 else
                 "; device busy: no device events in this torch's profiler output (see the trace)")
    print(line)
    print("\n## host time per phase of the step\n")
    print(md_table(["phase", "calls/step", "host ms/step"], phase_rows(prof, args.steps)))
    print(f"\n## top {args.top} {'kernels and copies by device' if cuda else 'operators by CPU'} time\n")
    headers = ["kernel / copy", "calls/step", "device ms/step"] if cuda else \
        ["operator", "calls/step", "self CPU ms/step"]
    print(md_table(headers, top_rows(prof, cuda, args.top, args.steps)))
    print(f"\nChrome trace: {trace}")
    from pretrain.train import distributed  # noqa: PLC0415

    distributed.finish(0)


if __name__ == "__main__":
    main()
