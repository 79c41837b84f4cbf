"""The preemption flag: set in the trainer process, ignored by forked DataLoader workers.

Slurm delivers the time-limit warning to every process of a job step; a worker that died of
it would make the DataLoader raise before the trainer could save its checkpoint.
"""
import os
import signal
import time

import torch
from torch.utils.data import DataLoader, IterableDataset

from pretrain.train.preempt import PreemptionFlag


class _Slow(IterableDataset):
    def __iter__(self):
        for i in range(40):
            time.sleep(0.05)
            yield torch.tensor([i])


def test_signal_to_the_whole_process_group_keeps_workers_alive():
    flag = PreemptionFlag()
    try:
        got = []
        it = iter(DataLoader(_Slow(), batch_size=None, num_workers=2, multiprocessing_context="fork"))
        workers = list(it._workers)
        assert len(workers) == 2
        for i, x in enumerate(it):
            got.append(int(x))
            if i == 5:
                # what slurmstepd does: the signal reaches the trainer and its workers
                for w in workers:
                    os.kill(w.pid, signal.SIGUSR1)
                os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.signum == signal.SIGUSR1
        assert len(got) == 80  # both workers delivered everything: none was killed
    finally:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
