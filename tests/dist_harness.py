"""Run a function in N CPU processes joined in a gloo process group; collect per-rank results.

    from dist_harness import run_distributed

    def work(rank: int, world_size: int, x: int) -> dict:      # module level (picklable)
        ...                                                     # torch.distributed is ready
        return {"loss": loss.detach()}

    results = run_distributed(work, 2, 7)                       # [result_rank0, result_rank1]

Processes come from the test process's multiprocessing fork server (safe for CUDA/NCCL code,
like spawn: the server never touches a device), the one the DataLoader workers use
(pretrain/data/workers.py: started with SIGTERM/SIGUSR1 blocked, which each rank unblocks);
started here, it imports the trainer (torch, DeepSpeed) once besides the workers' modules; a
spawned rank would import them again, ~2.5 CPU-seconds each on a 2-core x86 CPU. Each rank
gets the caller's environment as it is at the call (the server's own is the one it was
started with), plus MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK for env:// users
(`deepspeed.init_distributed`); pass `init_group=False` to let `fn` create the group
itself. Results travel through torch.save files in a temp dir (tensors sent through a queue
die with the process that shared them). A rank's exception is re-raised in the caller with
its traceback; a hang is killed after `timeout_s`. Each worker ends with barrier +
destroy_process_group + immediate exit, which avoids gloo's rare abort at interpreter exit
(docs/cpu_development.md).
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import tempfile
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.data import workers
from pretrain.train.distributed import free_port  # tests import it from here too

START_METHOD = "forkserver"
# Imported by the fork server before its first fork where this starts it (a failed preload is
# skipped there; the rank then imports it itself, as it does when a DataLoader started the server).
PRELOAD = [*workers.PRELOAD, "torch.distributed", "pretrain.train"]


def _worker(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    out_dir: str,
    init_group: bool,
    threads: int,
    timeout_s: float,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    env: dict[str, str],
) -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, workers.QUIET_SIGNALS)  # the server's mask
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    # Several ranks share few cores: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(threads)
    if init_group:
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    result = fn(rank, world_size, *args, **kwargs)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    init_group: bool = True,
    threads: int = 1,
    **kwargs: Any,
) -> list[Any]:
    """Call `fn(rank, world_size, *args, **kwargs)` in `world_size` new processes.

    `fn` and its arguments must be picklable (module-level function). Returns the list of
    the ranks' return values, in rank order.
    """
    mp.get_context(START_METHOD).set_forkserver_preload(PRELOAD)  # no effect once the server runs
    workers.start_fork_server()
    with tempfile.TemporaryDirectory(prefix="dist_harness_") as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(fn, world_size, free_port(), out_dir, init_group, threads, timeout_s, args, kwargs,
                  dict(os.environ)),
            nprocs=world_size,
            join=False,
            start_method=START_METHOD,
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):  # raises ProcessRaisedException on a rank's error
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run_distributed: {fn.__name__} x{world_size} ran past {timeout_s} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world_size)
        ]
