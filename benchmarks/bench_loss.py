"""Loss benchmark: time and peak memory of forward + backward of one rank's share of the
distributed contrastive loss, "clip" (b x B logits) against "clip_tiled" (column blocks).

    .venv/bin/python benchmarks/bench_loss.py [--batch 32768] [--dims 512 1024]
        [--world-sizes 1 2 4 8 16 32 64] [--losses clip clip_tiled] [--repeats 2]
        [--block-size N] [--max-gib 16]

A simulated world size W means: this one process computes what one of W ranks computes at
global batch B, i.e. b = B / W local rows against B gathered rows. The gathered features
are leaves that require grad (standing in for the all-gather's output), so their gradients
(B x d each) are part of the measured memory, and no collective is timed. Printed beside
each row: the floor that ANY all-gather design pays, the gathered image and text features
and their gradients (4 x B x d x 4 bytes in fp32).

Memory: on CUDA, torch.cuda.max_memory_allocated around the step; on CPU, every
configuration runs in a fresh subprocess and reports its peak resident set (VmHWM, reset
after the inputs are made) minus the resident set before the inputs were made (so it
includes the inputs: local and gathered features), with glibc's mmap threshold fixed at
1 MiB so that freed tensors leave the resident set (closer to a GPU allocator's live
bytes). Configurations whose b x B logits would not fit in --max-gib are skipped and
marked. CPU times depend on the machine's load; compare rows measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from pretrain.loss.clip import clip_local_sum  # noqa: E402
from pretrain.loss.blocks import auto_block_size  # noqa: E402
from pretrain.loss.tiled import clip_tiled_local_sum  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import reset_peak_rss, rss_bytes  # noqa: E402

MIB = 1 << 20


def plain_logit_bytes(b: int, total: int) -> int:
    """Rough peak of the plain loss beyond its inputs: two b x B logit matrices plus their
    log-softmax and gradient buffers, fp32."""
    return 4 * b * total * 4


def floor_bytes(total: int, d: int) -> int:
    """Gathered image + text features and their gradients, fp32."""
    return 4 * total * d * 4


def measure(
    loss: str, total: int, d: int, world: int, repeats: int, warmup: int, block: int | None, device: str
) -> dict[str, Any]:
    """Time and peak memory of `repeats` forward+backward steps of one rank's share."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    base = torch.cuda.memory_allocated() if cuda else rss_bytes("VmRSS")
    b = total // world
    g = torch.Generator(device="cpu").manual_seed(0)

    def unit(n: int) -> torch.Tensor:
        x = torch.randn(n, d, generator=g)
        return (x / x.norm(dim=1, keepdim=True)).to(dev).requires_grad_()

    img, txt, all_img, all_txt = unit(b), unit(b), unit(total), unit(total)
    scale = torch.tensor(1 / 0.07, device=dev, requires_grad=True)
    if not cuda:
        reset_peak_rss()  # the inputs' creation temporaries are not the loss's
    offset = 0  # rank 0's share; any rank computes the same amount
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + repeats):
        for t in (img, txt, all_img, all_txt, scale):
            t.grad = None
        start = time.perf_counter()
        if loss == "clip":
            out = clip_local_sum(img, txt, all_img, all_txt, offset, scale)
        else:
            out = clip_tiled_local_sum(img, txt, all_img, all_txt, offset, scale, block)
        (out * (world / total)).backward()
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
        del out
    peak = (torch.cuda.max_memory_allocated() if cuda else rss_bytes("VmHWM")) - base
    return {"time_s": statistics.median(times), "peak_bytes": peak}


def measure_isolated(args: argparse.Namespace, loss: str, d: int, world: int, device: str) -> dict[str, Any]:
    """CPU: run `measure` in a fresh process, so that its VmHWM is this configuration's."""
    if device != "cpu":
        return measure(loss, args.batch, d, world, args.repeats, args.warmup, args.block_size, device)
    cmd = [sys.executable, __file__, "--one", loss, str(d), str(world), "--batch", str(args.batch),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if args.block_size:
        cmd += ["--block-size", str(args.block_size)]
    # A fixed mmap threshold turns off glibc's dynamic one, which otherwise serves freed-then-
    # reallocated tensors from a heap that never shrinks: RSS then tracks live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32768, help="global batch B")
    p.add_argument("--dims", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--losses", nargs="+", default=["clip", "clip_tiled"], choices=["clip", "clip_tiled"])
    p.add_argument("--repeats", type=int, default=2, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--block-size", type=int, default=None, help="tiled columns per block (default: auto)")
    p.add_argument("--max-gib", type=float, default=16.0, help="skip plain configs whose logits exceed this")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: torch default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--one", nargs=3, metavar=("LOSS", "DIM", "WORLD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.one:  # child process of measure_isolated
        torch.ones(64, 64) @ torch.ones(64, 64)  # load the BLAS and thread pool before the baseline
        loss, d, world = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(measure(loss, args.batch, d, world, args.repeats, args.warmup, args.block_size, "cpu")))
        return

    print(f"# loss fwd+bwd, one rank's share, global batch {args.batch}, fp32, device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'dim':>5} {'W':>3} {'b':>6} {'block':>6} {'floor MiB':>9} | {'clip s':>8} {'clip MiB':>9} | "
          f"{'tiled s':>8} {'tiled MiB':>9} | {'mem ratio':>9} {'time ratio':>10} {'tiled/floor':>11}")
    for d in args.dims:
        for world in args.world_sizes:
            b = args.batch // world
            row: dict[str, dict[str, Any] | None] = {}
            for loss in args.losses:
                if loss == "clip" and plain_logit_bytes(b, args.batch) > args.max_gib * (1 << 30):
                    row[loss] = None  # would not fit: skipped, marked "-"
                    continue
                row[loss] = measure_isolated(args, loss, d, world, args.device)
            block = args.block_size or auto_block_size(b, args.batch)
            cells = []
            for loss in ("clip", "clip_tiled"):
                r = row.get(loss)
                cells.append(f"{r['time_s']:8.3f} {r['peak_bytes'] / MIB:9.0f}" if r else f"{'-':>8} {'-':>9}")
            plain, tiled = row.get("clip"), row.get("clip_tiled")
            floor = floor_bytes(args.batch, d)
            ratios = (f"{tiled['peak_bytes'] / plain['peak_bytes']:9.3f} {tiled['time_s'] / plain['time_s']:10.2f}"
                      if plain and tiled else f"{'-':>9} {'-':>10}")
            over_floor = f"{tiled['peak_bytes'] / floor:11.2f}" if tiled else f"{'-':>11}"
            head = f"{d:5d} {world:3d} {b:6d} {block:6d} {floor / MIB:9.0f}"
            print(f"{head} | {cells[0]} | {cells[1]} | {ratios} {over_floor}", flush=True)


if __name__ == "__main__":
    main()
