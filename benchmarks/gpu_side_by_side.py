"""Our trainer's step against open_clip's training step, side by side on one GPU.

    .venv/bin/python benchmarks/gpu_side_by_side.py                 # one GPU, < 8 min
    .venv/bin/python benchmarks/gpu_side_by_side.py --dry-run       # CPU: tiny models, checks the logic
        [--batch 256] [--steps 10] [--warmup 3] [--models ViT-B-32,ViT-B-16,RN50]
        [--fast] [--override model.compile=blocks ...] [--no-compile] [--peak-tflops 989]

Each row is one fresh child process per side (an OOM or allocator state never leaks):
- ours: `gpu_bench.build_bench` (run config, DeepSpeed ZeRO-1 bf16 engine, `train_step`,
  synthetic inputs on the device), with `--fast` (the trainer-step switches of
  profile_step.FAST_OVERRIDES) and any `--override KEY=VALUE` run-config overrides passed
  through (e.g. the model-side `model.*` switches);
- open_clip: `open_clip.create_model(name)` + `open_clip.loss.ClipLoss`, autocast bf16,
  torch AdamW (fused), its SDPA attention, `torch.compile` of the model unless
  --no-compile, the same synthetic inputs on the device: open_clip's own training step
  (open_clip_train.train.train_one_epoch without data loading).
Printed: samples/s, MFU (3 x forward FLOPs counted by FlopCounterMode on each side's own
model / peak), peak memory, and ours / open_clip. Where open_clip is not importable, its
column says so and why (install: scripts/fetch_gpu_wheels.sh), and our side still runs.
The dry run uses ViT-tiny / RN-tiny on our side and skips open_clip (it has no tiny models
under the same names).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from _common import machine_line, md_table, run_child  # noqa: E402

# open_clip's model names -> ours
OURS = {"ViT-B-32": "ViT-B/32", "ViT-B-16": "ViT-B/16", "RN50": "RN50"}
DRY_OURS = {"ViT-B-32": "ViT-tiny", "RN50": "RN-tiny"}
HEADERS = ["model", "batch", "ours samples/s", "ours MFU", "ours peak GiB", "open_clip samples/s",
           "open_clip MFU", "open_clip peak GiB", "ours / open_clip"]


def open_clip_missing() -> str | None:
    """None when open_clip imports, else why not."""
    try:
        import open_clip  # noqa: F401, PLC0415
    except ImportError as e:
        return f"open_clip not importable ({e}); run scripts/fetch_gpu_wheels.sh and install the wheels"
    return None


def child_open_clip(spec: dict[str, Any]) -> dict[str, Any]:
    """open_clip's training step in this process (see the module docstring)."""
    import time  # noqa: PLC0415

    import open_clip  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from open_clip.loss import ClipLoss  # noqa: PLC0415
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    model = open_clip.create_model(spec["model"], precision="fp32", device=device)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    n = spec["batch"]
    images = torch.randn(n, 3, image_size, image_size, device=device)
    tokens = torch.randint(1, 49406, (n, 77), device=device)
    tokens[:, -1] = 49407
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images[:2], tokens[:2])
    fwd_flops = counter.get_total_flops() / 2
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.2, fused=True)
    loss_fn = ClipLoss()
    run = torch.compile(model) if spec["compile"] else model

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = run(images, tokens)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        opt.step()
        return loss

    torch.cuda.reset_peak_memory_stats()
    for _ in range(spec["warmup"]):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {"samples_per_s": spec["steps"] * n / elapsed, "fwd_flops_per_sample": fwd_flops,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["side"] == "open_clip":
        return child_open_clip(spec)
    from gpu_bench import child_run  # noqa: PLC0415

    return child_run(spec)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    return run_child([sys.executable, __file__, "--child", json.dumps(spec)], timeout=900)


def fmt_mfu(r: dict[str, Any], peak: float | None) -> str:
    if peak is None:
        return "- (peak unknown)"
    return f"{100 * r['samples_per_s'] * 3 * r['fwd_flops_per_sample'] / peak:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--batch", type=int, default=None, help="per-GPU batch (default 256; dry 8)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; dry 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; dry 1)")
    ap.add_argument("--models", default=None, help="open_clip names, comma-separated (default ViT-B-32,ViT-B-16,RN50)")
    ap.add_argument("--fast", action="store_true", help="our trainer-step speed switches on")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="run-config override for our side (repeatable), e.g. model.compile=blocks")
    ap.add_argument("--no-compile", action="store_true", help="open_clip without torch.compile")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--out-dir", default="/tmp/gpu_side_by_side")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import torch  # noqa: PLC0415

    from gpu_bench import peak_flops  # noqa: PLC0415
    from profile_step import FAST_OVERRIDES  # noqa: PLC0415

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU, or pass --dry-run to check the script on CPU")
    batch = args.batch or (8 if dry else 256)
    steps, warmup = args.steps or (1 if dry else 10), args.warmup or (1 if dry else 3)
    names = args.models.split(",") if args.models else (list(DRY_OURS) if dry else list(OURS))
    table = DRY_OURS if dry else OURS
    overrides = (FAST_OVERRIDES if args.fast else []) + [o.removeprefix("--") for o in args.override]
    missing = "dry run: open_clip has no tiny models" if dry else open_clip_missing()
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_flops(args, device_name)
    print(machine_line("cuda" if not dry else "cpu") + (" (DRY RUN: tiny models)" if dry else ""))
    print(f"# batch {batch}, bf16{' (fp32 on CPU)' if dry else ''}, {warmup} warm-up + {steps} timed steps; "
          f"our overrides: {' '.join(overrides) or 'none'}; open_clip: "
          f"{missing or ('torch.compile' if not args.no_compile else 'eager')}")
    rows = []
    for name in names:
        ours_name = table.get(name)
        if ours_name is None:
            sys.exit(f"unknown model {name!r}; known: {sorted(table)}")
        spec = {"side": "ours", "model": ours_name, "ckpt": False, "precision": "fp32" if dry else "bf16",
                "micro_batch": batch, "global_batch": batch, "steps": steps, "warmup": warmup,
                "out_dir": args.out_dir, "extra": [f"--{o}" for o in overrides]}
        ours = run(spec)
        row = [name, batch]
        if not ours.get("fits", True):
            row += ["OOM", "-", "-"]
        else:
            row += [f"{ours['samples_per_s']:.1f}", fmt_mfu(ours, peak),
                    f"{ours['peak_gib']:.1f}" if ours.get("peak_gib") else "-"]
        if missing:
            row += ["skipped", "-", "-", "-"]
        else:
            theirs = run({"side": "open_clip", "model": name, "batch": batch, "steps": steps, "warmup": warmup,
                          "compile": not args.no_compile})
            ratio = f"{ours['samples_per_s'] / theirs['samples_per_s']:.2f}x" if ours.get("fits", True) else "-"
            row += [f"{theirs['samples_per_s']:.1f}", fmt_mfu(theirs, peak), f"{theirs['peak_gib']:.1f}", ratio]
        rows.append(row)
        print(md_table(HEADERS, [row]).splitlines()[-1], flush=True)
    print()
    print(md_table(HEADERS, rows))
    if missing:
        print(f"\nopen_clip side skipped: {missing}")


if __name__ == "__main__":
    main()
