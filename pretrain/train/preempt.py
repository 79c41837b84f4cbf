"""Preemption: SIGUSR1 / SIGTERM set a flag; all ranks agree on it at step boundaries.

Slurm sends the time-limit warning (`--signal=USR1@T`) and, for `scancel`, preemption and the
time limit itself, SIGTERM to every task, but not necessarily at the same moment, so each rank
could see it at a different step. `requested()` all-reduces the flag (MAX) so that every rank
stops after the same step and saves the same checkpoint; the agreed signal decides the exit
code, the same on every rank:

- SIGUSR1 (the warning) -> exit 0 (`EXIT_PREEMPTED_USR1`): the batch script (slurm/common.sh)
  requeues the job itself when it sees exit 0 plus the log line
  `preempted: checkpoint saved at step N`.
- SIGTERM (on any rank) -> exit 143 (`EXIT_PREEMPTED_TERM`, 128 + SIGTERM, what a shell reports
  for a process ended by SIGTERM): the run is *not* finished, so no supervisor may read it as
  success. Slurm requeues a preempted `--requeue` job by itself and keeps a cancelled one
  cancelled, whatever the exit code; Kubernetes Jobs, systemd `Restart=on-failure` and
  torchrun `--max-restarts` restart a non-zero exit; a cluster may list 143 in slurm.conf's
  `RequeueExit`. The checkpoint is saved either way, and the next start resumes from it.

DataLoader workers never see either signal (pretrain/data/workers.py blocks them in the fork
server and its workers), so the trainer's loader keeps running until the boundary.
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
EXIT_PREEMPTED_USR1 = 0
EXIT_PREEMPTED_TERM = 128 + signal.SIGTERM  # 143
# All-reduce code of each signal: MAX picks SIGTERM when any rank got it.
_RANK = {None: 0.0, signal.SIGUSR1: 1.0, signal.SIGTERM: 2.0}


class PreemptionFlag:
    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
        self.signum: int | None = None  # this process's own signal
        self.agreed: signal.Signals | None = None  # what all ranks agreed on (after requested())
        self.pid = os.getpid()
        for sig in signals:
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self.pid:
            # A child forked from the trainer (not a DataLoader worker: those come from the
            # fork server with these signals blocked) inherited this handler: USR1 is ignored
            # there, SIGTERM keeps its default action so that terminate() still ends it.
            if signum == signal.SIGUSR1:
                return
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        # Only set the flag: the step in progress finishes, the boundary check acts on it. A
        # SIGTERM is not overwritten by a later USR1 (it decides the exit code).
        if self.signum != signal.SIGTERM:
            self.signum = signum

    def requested(self, device: torch.device) -> bool:
        """Collective: True on every rank when any rank received a preemption signal.

        The flag is agreed on over a CPU (gloo) group, never on the accelerator: reading an
        NCCL result back would wait for all the GPU work queued before it, once per step.
        `device` is kept for the callers; the flag itself lives on the host."""
        flag = torch.tensor([_RANK.get(self.signum, 0.0)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._host_group())
        code = flag.item()
        if code <= 0:
            return False
        self.agreed = signal.SIGTERM if code >= 2 else signal.SIGUSR1
        own = signal.Signals(self.signum).name if self.signum is not None else "none here"
        log.warning("preemption requested: %s (this rank: %s)", self.agreed.name, own)
        return True

    def _host_group(self):
        """The default group when it is gloo already, else a gloo group of all ranks (created
        at the first check, which every rank reaches at the same point)."""
        if dist.get_backend() == "gloo":
            return None
        if getattr(self, "_gloo", None) is None:
            self._gloo = dist.new_group(backend="gloo")
        return self._gloo

    @property
    def exit_code(self) -> int:
        """The process exit code after the preemption checkpoint (see the module docstring)."""
        return EXIT_PREEMPTED_TERM if self.agreed == signal.SIGTERM else EXIT_PREEMPTED_USR1
