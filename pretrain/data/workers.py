"""How DataLoader worker processes are started: from a fork server, never by forking the trainer,
and deaf to the preemption signals (SIGTERM, SIGUSR1), which only the trainer acts on.

A trainer or evaluator is multi-threaded (the MLflow logger, the feeder threads of the previous
loader's queues, library pools). Forking such a process copies whatever another thread was in
the middle of: a CPython < 3.12 child forked while a thread is being torn down hangs in
``PyOS_AfterFork_Child``, and a lock held by another thread stays locked for ever in the child.
The ``forkserver`` start method forks workers from a small single-threaded server process that
has imported the data modules once, so a worker starts in milliseconds and inherits no thread
state (Python 3.14 made it the Linux default for this reason). Where the platform has no fork
server (macOS, Windows) the platform's default, ``spawn``, is already safe.

Signals. Slurm's ``scancel``, preemption and time limit send SIGTERM (and the time-limit
warning SIGUSR1) to every process of a job step; ``kill -TERM -<pgid>`` and the deepspeed
launcher do the same to a process group. A worker that died of it made the trainer's
DataLoader raise "worker exited unexpectedly" before the trainer reached the step boundary
where it checkpoints, and a dead fork server takes its workers with it (a worker exits when
its parent, the server, is gone). So the fork server is started with both signals *blocked*;
its workers inherit that mask (blocked, not ignored: PyTorch's worker installs its own SIGTERM
handler, which a mask makes irrelevant). Both exit when their parent goes: the server when
the last process holding its "alive" pipe ends, a worker through PyTorch's manager watchdog.
Because a worker can no longer be stopped by SIGTERM, the DataLoader's own last resort,
``Process.terminate()`` on a worker that did not join in time, sends SIGKILL instead: a
straggler never outlives its loader.

    DataLoader(ds, num_workers=4, multiprocessing_context=worker_context(4))
"""
from __future__ import annotations

import multiprocessing
import signal
from multiprocessing import context as mp_context
from multiprocessing.context import BaseContext

# Imported once by the fork server, so each worker it forks starts with them (torch included).
PRELOAD = ["torch", "pretrain.data.loader", "pretrain.eval.features"]

# The signals a worker must survive; the trainer (pretrain.train.preempt) acts on them.
QUIET_SIGNALS = frozenset(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


def _quiet() -> None:
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, QUIET_SIGNALS)


if hasattr(mp_context, "ForkServerProcess"):
    class _WorkerProcess(mp_context.ForkServerProcess):
        """A forkserver process that blocks the preemption signals and is killed, not terminated."""

        def run(self) -> None:
            _quiet()  # also when a fork server started by other code (without the mask) forked it
            super().run()

        def terminate(self) -> None:
            # SIGTERM is blocked in the worker: DataLoader's fallback for a worker that did
            # not exit after its join timeout must not leave it running.
            self.kill()

    class _WorkerContext(mp_context.ForkServerContext):
        Process = _WorkerProcess

    _CONTEXT: BaseContext | None = _WorkerContext()
else:  # pragma: no cover - platforms without a fork server
    _CONTEXT = None


def start_fork_server() -> None:
    """Start this process's fork server (once; again if it died) with the preemption signals
    blocked, preloading what `set_forkserver_preload` last named (`worker_context`: PRELOAD;
    tests/dist_harness.py: PRELOAD and the trainer, whose ranks it forks from the same server).

    The mask is inherited through fork and exec. The resource tracker is started first:
    starting it unblocks SIGTERM in the calling thread (CPython's resource_tracker blocks
    and then unblocks SIGINT/SIGTERM around its own spawn). Signals that reach this thread
    meanwhile stay pending and are handled by the trainer's handler once unblocked."""
    from multiprocessing import forkserver, resource_tracker

    resource_tracker.ensure_running()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, QUIET_SIGNALS)
    try:
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def worker_context(num_workers: int) -> BaseContext | None:
    """The multiprocessing context for `num_workers` DataLoader workers (None: no workers,
    which DataLoader requires, or the platform's default start method)."""
    if num_workers <= 0 or _CONTEXT is None or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    _CONTEXT.set_forkserver_preload(PRELOAD)  # no effect once the server runs; it is per process
    start_fork_server()
    return _CONTEXT
