"""Preemption: SIGUSR1 / SIGTERM set a flag; all ranks agree on it at step boundaries.

Slurm sends the warning signal (`--signal=USR1@120`) to every task, but not necessarily at
the same moment, so each rank could see it at a different step. `requested()` all-reduces
the flag (MAX) so that every rank stops after the same step, saves the same checkpoint and
exits 0; the job script requeues the job, which resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
        self.signum: int | None = None
        self.pid = os.getpid()
        for sig in signals:
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self.pid:
            # A forked child (DataLoader worker) inherited this handler. Slurm sends the
            # time-limit warning (USR1) to every process of a job step, workers included: a
            # worker that died of it would make the trainer's DataLoader raise before it could
            # checkpoint, so workers ignore USR1 and the trainer acts on it. SIGTERM keeps its
            # default action in workers: the DataLoader's own shutdown relies on it.
            if signum == signal.SIGUSR1:
                return
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        # Only set the flag: the step in progress finishes, the boundary check acts on it.
        self.signum = signum

    def requested(self, device: torch.device) -> bool:
        """Collective: True on every rank when any rank received a preemption signal."""
        flag = torch.tensor([0.0 if self.signum is None else 1.0], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        hit = bool(flag.item() > 0)
        if hit and self.signum is not None:
            log.warning("received %s", signal.Signals(self.signum).name)
        return hit
