"""Our three contrastive losses on REAL ranks: forward + backward time and peak memory per
rank with the collectives included, W processes joined by gloo (NCCL on CUDA).

    .venv/bin/python benchmarks/bench_loss_dist.py [--world 2] [--batch 8192] [--dims 512 1024]
        [--losses clip clip_tiled clip_ring] [--repeats 3] [--threads 1]

What the one-process benchmarks (bench_loss.py, bench_vs_openclip_loss.py) cannot show: the
ring's point-to-point hops and the all-gathers really run here. Each rank holds b = B / W
rows of unit features and calls the loss through `get_loss(name)`, exactly as the trainer
does; every rank reports the median time of --repeats steps (after one warm-up step) and
its peak resident set above the level before its inputs were made (CPU; on CUDA the
allocator's peak), each configuration in fresh processes. The table gives the slowest rank's time and the largest rank's memory,
with each loss's ratio to "clip" (the all-gather loss with materialised logits). With W
processes on a machine with fewer than W x --threads cores the ranks share cores; compare
rows of one run only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from _common import MIB, PeakMemory, machine_line, md_table  # noqa: E402
from pretrain.train.distributed import free_port  # noqa: E402  (below the ephemeral range)


def _rank(rank: int, world: int, port: int, name: str, d: int, args: argparse.Namespace, out: str) -> None:
    """One rank of one configuration (a fresh process group per configuration, so every
    peak resident set is that configuration's alone)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    from pretrain.loss import get_loss  # noqa: PLC0415

    loss_fn = get_loss(name)
    # One tiny step first: group buffers, thread pools and lazy imports are set up before
    # the baseline.
    x = torch.nn.functional.normalize(torch.randn(64, 8), dim=1).to(device).requires_grad_()
    loss_fn(x, x.detach().clone(), torch.tensor(10.0, device=device)).backward()
    mem = PeakMemory(device)
    g = torch.Generator().manual_seed(rank)
    b = args.batch // world
    img = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1).to(device).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1).to(device).requires_grad_()
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    mem.reset_peak()
    times = []
    for step in range(1 + args.repeats):
        img.grad = txt.grad = scale.grad = None
        dist.barrier()
        start = time.perf_counter()
        loss_fn(img, txt, scale).backward()
        if cuda:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    torch.save({"time_s": statistics.median(times), "peak_bytes": float(mem.peak())}, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8192, help="global batch B")
    ap.add_argument("--dims", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--losses", nargs="+", default=["clip", "clip_tiled", "clip_ring"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    args = ap.parse_args()
    if "clip" not in args.losses:
        args.losses.insert(0, "clip")  # the baseline of the ratios
    print(machine_line("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"# {args.world} real ranks, global batch {args.batch}, fp32, 1 warm-up + {args.repeats} timed steps "
          f"(median), {args.threads} thread(s) per rank, a fresh process group per row; slowest rank's time, "
          "largest rank's peak memory")
    measured: dict[tuple[str, int], dict[str, float]] = {}
    for d in args.dims:
        for name in args.losses:
            with tempfile.TemporaryDirectory() as out:
                mp.spawn(_rank, args=(args.world, free_port(), name, d, args, out), nprocs=args.world, join=True)
                per_rank = [torch.load(Path(out) / f"rank{r}.pt") for r in range(args.world)]
            measured[name, d] = {"time_s": max(r["time_s"] for r in per_rank),
                                 "peak_bytes": max(r["peak_bytes"] for r in per_rank)}
    headers = ["dim", "loss", "time s", "peak MiB", "time / clip", "memory / clip"]
    rows = []
    for d in args.dims:
        base = measured["clip", d]
        for name in args.losses:
            t, m = measured[name, d]["time_s"], measured[name, d]["peak_bytes"]
            rows.append([d, name, f"{t:.3f}", round(m / MIB), f"{t / base['time_s']:.2f}x",
                         f"{m / base['peak_bytes']:.2f}x"])
    print(md_table(headers, rows))


if __name__ == "__main__":
    main()
