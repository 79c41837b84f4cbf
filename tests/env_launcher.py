"""The tests' node launcher: N local ranks of a training script with the env:// layout that
DeepSpeed's node launcher (`python -m deepspeed.launcher.launch`, deepspeed/launcher/launch.py)
gives them, from a process that imports nothing but the standard library.

    python tests/env_launcher.py --nprocs 2 --master_port 29600 pretrain/run.py --output_dir=... ...

Each rank runs `python -u SCRIPT --local_rank=R ARGS...` with MASTER_ADDR=127.0.0.1,
MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_SIZE (read by DeepSpeed's CPU accelerator
as its device count), CROSS_RANK=0, CROSS_SIZE=1: the variables DeepSpeed's launcher sets on
one node. Like it, this launcher waits for every rank (one line per rank's exit code), and when
one exits non-zero ends the others (SIGTERM, SIGKILL after 30 s) and exits with that rank's
code; a SIGTERM or SIGINT to it is passed on to the ranks, whose own exit codes then decide.

Why not DeepSpeed's: its module imports all of DeepSpeed (and through its autotuner MLflow),
~4 CPU-seconds before the first rank starts, on each of the suite's few dozen launches. The
tests that are about the `deepspeed` command itself run it (tests/train_driver.py,
`launcher="cli"`); the ranks are the same processes either way.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

GRACE_S = 30  # DeepSpeed's launcher, too, waits 30 s before SIGKILL (terminate_process_tree)


def _end(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nprocs", type=int, required=True)
    parser.add_argument("--master_port", type=int, required=True)
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.master_port),
                WORLD_SIZE=str(args.nprocs), LOCAL_SIZE=str(args.nprocs), CROSS_RANK="0", CROSS_SIZE="1")
    procs = [subprocess.Popen([sys.executable, "-u", args.script, f"--local_rank={r}", *args.args],
                              env=dict(base, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(args.nprocs)]

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    reported: set[int] = set()
    while True:
        codes = [p.poll() for p in procs]
        for r, code in enumerate(codes):
            if code is not None and r not in reported:  # what DeepSpeed's launcher logs, as one line
                print(f"[env_launcher] rank {r} (pid {procs[r].pid}) exited with code {code}", flush=True)
                reported.add(r)
        failed = next((c for c in codes if c not in (None, 0)), None)
        if failed is not None:
            _end(procs)
            return failed if failed > 0 else 128 - failed  # killed by signal N: 128+N, as a shell says
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
