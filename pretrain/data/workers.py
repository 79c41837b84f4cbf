"""How DataLoader worker processes are started: from a fork server, never by forking the trainer.

A trainer or evaluator is multi-threaded (the MLflow logger, the feeder threads of the previous
loader's queues, library pools). Forking such a process copies whatever another thread was in
the middle of: a CPython < 3.12 child forked while a thread is being torn down hangs in
``PyOS_AfterFork_Child``, and a lock held by another thread stays locked for ever in the child.
The ``forkserver`` start method forks workers from a small single-threaded server process that
has imported the data modules once, so a worker starts in milliseconds and inherits no thread
state (Python 3.14 made it the Linux default for this reason). Where the platform has no fork
server (macOS, Windows) the platform's default, ``spawn``, is already safe.

    DataLoader(ds, num_workers=4, multiprocessing_context=worker_context(4))
"""
from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext

# Imported once by the fork server, so each worker it forks starts with them (torch included).
PRELOAD = ["torch", "pretrain.data.loader", "pretrain.eval.features"]


def worker_context(num_workers: int) -> BaseContext | None:
    """The multiprocessing context for `num_workers` DataLoader workers (None: no workers,
    which DataLoader requires, or the platform's default start method)."""
    if num_workers <= 0 or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # no effect once the server runs; it is per process
    return ctx
