"""Loss side by side: ours (`get_loss("clip_tiled")` and the ring-exchange `clip_ring`)
against open_clip's `ClipLoss(local_loss=True, gather_with_grad=True)`: time and peak
memory of forward + backward of ONE rank's share at global batch B, for simulated world
sizes W.

    .venv-bench/bin/python benchmarks/bench_vs_openclip_loss.py              # full: B=32768
    .venv-bench/bin/python benchmarks/bench_vs_openclip_loss.py --batch 8192 # CPU-sized
        [--dims 512 1024] [--world-sizes 1 2 4 8 16 32 64] [--repeats 1] [--warmup 1] [--rounds 1]
        [--max-gib GiB] [--threads 2] [--device cpu|cuda]

Simulated world size W: one process computes what rank 0 of W computes, b = B / W local
rows against the B gathered rows. Both losses are called through their public entry
points; the all-gather of each is monkeypatched IN THIS SCRIPT ONLY to return the same
pre-made gathered features (leaves with requires_grad, standing in for the autograd
all-gather's output), and ours is told the world size the same way (`world_info`):
  - open_clip: `open_clip.loss.gather_features` -> (all_image, all_text); the loss is built
    with rank=0, world_size=W, so it takes its local-loss branch and offsets its labels;
  - ours: `pretrain.loss.tiled.gather_pair` -> (all_image, all_text, offset 0) and
    `pretrain.loss.tiled.world_info` -> (0, W).
At W = 1 the gather is a no-op on both sides (gathered = local). Before timing, both are
checked to give the same loss and gradients on a small case (so they are fed equivalently).

Ring (`pretrain.loss.ring.ring_local_sum`, what `clip_ring` runs): rank 0 of a simulated
ring (`SimRing`) that receives, at each hop, a fresh buffer with another rank's text block
(here: rank 0's own rows rolled by the source rank, so every block differs), column
statistics of plausible values and, in the backward, gradient accumulators (zeros). It
never holds the gathered batch, so its memory may fall below the all-gather floor, and it
computes each logit of the global matrix once (rank 0's row stripe), so its time may fall
below open_clip's. Its time is compute only: the hops of a real ring (W - 1 of b x d texts
each way, overlapped with the matmuls, and W of the b x d text gradients and of 3 b column
statistics) are not simulated. It is checked against open_clip at W = 1 (the exchange
itself is checked by the tests).

Memory: bytes above the level before the inputs were made, so it includes the local and
gathered features and their gradients, at their peak during the step: CUDA
`max_memory_allocated`; CPU the peak resident set (VmHWM, reset after the inputs are made)
of a fresh child process per configuration (see benchmarks/README.md). The "floor" column
is what any all-gather design pays: gathered features + their gradients, 2 x B x d x 4 bytes
x 2 towers (fp32). Target (issue 8): ours <= 1/4 of open_clip's peak for W <= 8 at <= 1.1x
its time. open_clip rows whose estimated peak exceeds --max-gib are skipped and marked.
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from _common import MIB, PeakMemory, machine_line, md_table, require_open_clip  # noqa: E402

IMPLS = ("open_clip", "ours", "ring")


def floor_bytes(total: int, d: int) -> int:
    """Gathered image + text features and their gradients, fp32: 2 x B x d x 4 x 2."""
    return 2 * total * d * 4 * 2


def open_clip_estimate(b: int, total: int, d: int) -> int:
    """Rough open_clip peak: the floor plus two b x B logit matrices, their log-softmax and
    their gradients (about 6 b x B fp32 buffers at once)."""
    return floor_bytes(total, d) + 6 * b * total * 4


class SimRing:
    """Rank 0 of a W-rank ring of equal b-row blocks, in one process (see module doc): each
    received text block is rank 0's own rolled by the source rank, made when received, as a
    receive buffer would be; received column statistics are the ones sent (plausible values),
    received gradient accumulators are zeros."""

    def __init__(self, world: int, b: int) -> None:
        self.rank, self.world, self.sizes = 0, world, [b] * world
        self.feature_hops = 0

    def start_shift(self, tensor: torch.Tensor, recv_rows: int, tag: int) -> Any:
        from pretrain.loss.ring import FEATURES_TAG, GRADS_TAG  # noqa: PLC0415

        if self.world == 1:  # the one-rank ring: a block never leaves
            return tensor
        if tag == GRADS_TAG:
            return tensor.new_zeros((recv_rows, tensor.shape[1]))
        if tag != FEATURES_TAG:  # column statistics / their gradients: same shape and range
            return tensor.clone()
        # W - 1 feature hops per pass (forward, then backward): after hop k, rank -k's block
        self.feature_hops += 1
        k = (self.feature_hops - 1) % (self.world - 1) + 1
        return tensor.roll((-k) % self.world, dims=0)

    def finish_shift(self, handle: Any) -> torch.Tensor:
        return handle


def make_loss(impl: str, world: int, all_image: torch.Tensor, all_text: torch.Tensor,
              block_size: int | None) -> Any:
    """The loss callable of `impl` with its all-gather patched to return the given tensors
    (the ring: with its exchange simulated, see SimRing)."""
    if impl == "ring":
        from pretrain.loss.common import rank_share  # noqa: PLC0415
        from pretrain.loss.ring import ring_local_sum  # noqa: PLC0415

        def ring_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            ring = SimRing(world, img.shape[0])
            return rank_share(ring_local_sum(img, txt, scale.reshape(()), ring, block_size), world, world * img.shape[0])

        return ring_loss
    if impl == "open_clip":
        import open_clip.loss as ocl  # noqa: PLC0415

        ocl.gather_features = lambda *a, **k: (all_image, all_text)  # the simulated all-gather
        return ocl.ClipLoss(local_loss=True, gather_with_grad=True, rank=0, world_size=world)
    import pretrain.loss.tiled as tiled  # noqa: PLC0415
    from pretrain.loss import get_loss  # noqa: PLC0415

    tiled.gather_pair = lambda img, txt: (all_image, all_text, 0)  # rank 0: offset 0
    tiled.world_info = lambda: (0, world)
    return get_loss("clip_tiled", block_size=block_size) if block_size else get_loss("clip_tiled")


def unit_rows(n: int, d: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    x = torch.randn(n, d, generator=gen)
    return (x / x.norm(dim=1, keepdim=True)).to(device).requires_grad_()


def make_inputs(total: int, d: int, world: int, device: torch.device,
                gathered: bool = True) -> tuple[torch.Tensor, ...]:
    """(image, text, all_image, all_text, scale): rank 0's rows and the gathered batch.
    At W = 1, or with `gathered=False` (the ring), the "gathered" tensors ARE the local ones."""
    gen = torch.Generator().manual_seed(0)
    b = total // world
    img, txt = unit_rows(b, d, gen, device), unit_rows(b, d, gen, device)
    if world == 1 or not gathered:
        all_img, all_txt = img, txt
    else:
        all_img, all_txt = unit_rows(total, d, gen, device), unit_rows(total, d, gen, device)
        with torch.no_grad():  # rank 0's rows are the first b of the gathered batch
            all_img[:b].copy_(img)
            all_txt[:b].copy_(txt)
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)  # exp()'d logit scale
    return img, txt, all_img, all_txt, scale


def measure(impl: str, total: int, d: int, world: int, repeats: int, warmup: int,
            block_size: int | None, device: str) -> dict[str, Any]:
    """Median time and peak memory of forward+backward (one rank's share)."""
    dev = torch.device(device)
    mem = PeakMemory(dev)
    img, txt, all_img, all_txt, scale = make_inputs(total, d, world, dev, gathered=impl != "ring")
    loss_fn = make_loss(impl, world, all_img, all_txt, block_size)
    leaves = (img, txt, all_img, all_txt, scale)
    mem.reset_peak()
    times = []
    for step in range(warmup + repeats):
        for t in leaves:
            t.grad = None
        start = time.perf_counter()
        loss_fn(img, txt, scale).backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return {"time_s": statistics.median(times), "peak_bytes": mem.peak()}


def check_equivalence() -> None:
    """All sides agree in value and every gradient: tiled and open_clip fed the same simulated
    gather (W = 4); the ring at W = 1 (its multi-rank exchange cannot be simulated by one
    rank: tests/test_loss_ring.py and tests/test_loss_dist.py check it against the full batch
    with 1-5 simulated and 2 and 4 gloo ranks)."""
    names = ("loss", "d_img", "d_txt", "d_all_img", "d_all_txt", "d_scale")
    for world, impls in ((4, ("open_clip", "ours")), (1, ("open_clip", "ring"))):
        results = []
        for impl in impls:
            img, txt, all_img, all_txt, scale = make_inputs(256, 32, world, torch.device("cpu"))
            loss = make_loss(impl, world, all_img, all_txt, block_size=16)(img, txt, scale)
            loss.backward()
            results.append([loss.detach()] + [t.grad for t in (img, txt, all_img, all_txt, scale)])
        for name, a, b in zip(names, *results):
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-6):
                raise SystemExit(f"equivalence check failed for {impls[1]} (W={world}) on {name}: "
                                 f"max diff {(a - b).abs().max():.3g}")
    print("# equivalence check (B=256, d=32): ours (W=4) and the ring (W=1) equal open_clip in the loss "
          "and every gradient (1e-4)")


def _child(impl: str, total: int, d: int, world: int, repeats: int, warmup: int, block_size: int | None,
           threads: int) -> dict[str, Any]:
    """Runs in a fresh process forked from the fork server (torch already imported there, no
    thread pool started), so its peak resident set is this configuration's alone."""
    torch.set_num_threads(threads)
    # One tiny step of the same loss first: BLAS, thread pool, autograd engine and lazy
    # imports are set up before the baseline, so the peak is the configuration's own.
    measure(impl, 64, 8, min(world, 4), 1, 0, None, "cpu")
    return measure(impl, total, d, world, repeats, warmup, block_size, "cpu")


class Runner:
    """Measures one configuration: in-process on CUDA (the allocator's peak is exact), in a
    fresh process per configuration on CPU (peak RSS is per process)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pool = None
        if args.device == "cpu":
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["torch", "open_clip.loss", "pretrain.loss"])  # imported once
            self.pool = ctx.Pool(1, maxtasksperchild=1)  # a new process for every task

    def __call__(self, impl: str, d: int, world: int) -> dict[str, Any]:
        a = self.args
        if self.pool is None:
            torch.cuda.empty_cache()
            return measure(impl, a.batch, d, world, a.repeats, a.warmup, a.block_size, a.device)
        return self.pool.apply(_child, (impl, a.batch, d, world, a.repeats, a.warmup, a.block_size, a.threads))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def verdict(world: int, mem_r: float | None, time_r: float | None, b: int, total: int, d: int) -> str:
    """Issue 8's target for one side: <= 1/4 of open_clip's memory at <= 1.1x its time (W <= 8)."""
    if world > 8:
        return "n/a"
    if mem_r is None or time_r is None:
        return f"open_clip skipped (est. {open_clip_estimate(b, total, d) / (1 << 30):.0f} GiB)"
    if mem_r <= 0.25 and time_r <= 1.1:
        return "met"
    missed = [what for what, bad in (("mem", mem_r > 0.25), ("time", time_r > 1.1)) if bad]
    return f"NOT met ({'+'.join(missed)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32768, help="global batch B")
    p.add_argument("--dims", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--repeats", type=int, default=1, help="timed steps per configuration (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure both sides this many times, alternating order; report each side's minimum")
    p.add_argument("--block-size", type=int, default=None, help="ours: columns per block (default: auto)")
    p.add_argument("--max-gib", type=float, default=None,
                   help="skip open_clip rows estimated above this (default: 8 on CPU, 90%% of the GPU's memory)")
    p.add_argument("--threads", type=int, default=2, help="CPU intra-op threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-check", action="store_true", help="skip the equivalence check")
    p.add_argument("--no-ring", action="store_true", help="leave out the ring-exchange columns")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    require_open_clip()

    if args.max_gib is None:
        args.max_gib = 8.0 if args.device == "cpu" else 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30
    print(machine_line(args.device))
    print(f"# loss fwd+bwd of one rank's share, global batch {args.batch}, fp32, {args.warmup} warm-up + "
          f"{args.repeats} timed step(s), best of {args.rounds} alternating round(s); memory = peak above the "
          "pre-input level, inputs included")
    if not args.skip_check:
        check_equivalence()
    headers = ["dim", "W", "b", "floor MiB", "open_clip s", "open_clip MiB", "ours s", "ours MiB",
               "mem ours/oc", "time ours/oc", "ours/floor", "target (W<=8)",
               "ring s", "ring MiB", "mem ring/oc", "time ring/oc", "ring/floor", "ring target (W<=8)"]
    rows = []
    runner = Runner(args)
    impls = IMPLS if not args.no_ring else IMPLS[:2]
    print("| " + " | ".join(headers) + " |", flush=True)
    for d in args.dims:
        for world in args.world_sizes:
            b = args.batch // world
            runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in IMPLS}
            skip_oc = open_clip_estimate(b, args.batch, d) > args.max_gib * (1 << 30)  # marked, not run
            for r in range(args.rounds):
                # Alternate the order each round, so a slow spell of a shared machine does not
                # always fall on the same side; keep each side's best (least disturbed) figures.
                for impl in impls if r % 2 == 0 else impls[::-1]:
                    if not (impl == "open_clip" and skip_oc):
                        runs[impl].append(runner(impl, d, world))
            res: dict[str, dict[str, Any] | None] = {
                impl: {"time_s": min(x["time_s"] for x in xs), "peak_bytes": min(x["peak_bytes"] for x in xs)}
                if xs else None for impl, xs in runs.items()}
            oc = res["open_clip"]
            floor = floor_bytes(args.batch, d)
            row: list[Any] = [d, world, b, round(floor / MIB),
                              f"{oc['time_s']:.3f}" if oc else "-", round(oc["peak_bytes"] / MIB) if oc else "-"]
            for impl in ("ours", "ring"):
                mine = res[impl]
                if mine is None:  # --no-ring
                    row += ["-"] * (6 if impl == "ours" else 6)
                    continue
                mem_r = mine["peak_bytes"] / oc["peak_bytes"] if oc else None
                time_r = mine["time_s"] / oc["time_s"] if oc else None
                row += [f"{mine['time_s']:.3f}", round(mine["peak_bytes"] / MIB),
                        f"{mem_r:.3f}" if mem_r is not None else "-", f"{time_r:.2f}" if time_r is not None else "-",
                        f"{mine['peak_bytes'] / floor:.2f}", verdict(world, mem_r, time_r, b, args.batch, d)]
            rows.append(row)
            print(md_table(headers, [row]).splitlines()[-1], flush=True)
    runner.close()
    print()
    print(md_table(headers, rows))


if __name__ == "__main__":
    main()
