"""Preemption signals: set a flag in the trainer, never kill its DataLoader workers.

Slurm delivers the time-limit warning (SIGUSR1) and scancel / preemption / the time limit
(SIGTERM) to every process of a job step; a worker (or the fork server that starts the
workers) that died of it made the DataLoader raise before the trainer could save its
checkpoint. Here:
- unit: workers from `worker_context` (the fork server) survive both signals sent to them,
  to the fork server and to the trainer process; a worker stuck at shutdown is SIGKILLed by
  the DataLoader's own clean-up (it can no longer be stopped by SIGTERM);
- a real `deepspeed` launch of 2 CPU ranks with 2 data workers each: SIGTERM to the whole
  process group (runner, launcher, ranks, fork servers, workers) -> both ranks save the same
  checkpoint and exit 143, no process of the group is left; a relaunch resumes from that
  checkpoint and finishes.

Run: `.venv/bin/python -m pytest -q tests/test_preempt_signal.py`
"""
from __future__ import annotations

import multiprocessing.forkserver
import os
import re
import signal
import time

import psutil
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from pretrain.data.workers import worker_context
from pretrain.train.preempt import EXIT_PREEMPTED_TERM, PreemptionFlag


class _Slow(IterableDataset):
    def __iter__(self):
        for i in range(40):
            time.sleep(0.05)
            yield torch.tensor([i])


class _Stuck(IterableDataset):
    """Worker 0 hangs after its first item (as a worker blocked on a dead file system would)."""

    def __iter__(self):
        yield torch.tensor([0])
        if torch.utils.data.get_worker_info().id == 0:
            time.sleep(600)


@pytest.fixture
def flag():
    flag = PreemptionFlag()
    yield flag
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def test_signal_to_the_whole_process_group_keeps_fork_server_workers_alive(flag):
    got = []
    it = iter(DataLoader(_Slow(), batch_size=None, num_workers=2, multiprocessing_context=worker_context(2)))
    workers = [w.pid for w in it._workers]
    server = multiprocessing.forkserver._forkserver._forkserver_pid
    assert len(workers) == 2 and server is not None
    for i, x in enumerate(it):
        got.append(int(x))
        if i == 5:
            # what slurmstepd does: the signals reach the workers, their fork server and the trainer
            for pid in [*workers, server]:
                os.kill(pid, signal.SIGUSR1)
                os.kill(pid, signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGUSR1)  # a later USR1 does not hide the TERM
    assert flag.signum == signal.SIGTERM
    assert len(got) == 80  # both workers delivered everything: none was killed
    assert psutil.pid_exists(server) and psutil.Process(server).status() != psutil.STATUS_ZOMBIE


@pytest.mark.timeout(60)
def test_a_stuck_worker_that_ignores_sigterm_is_killed_at_shutdown():
    it = iter(DataLoader(_Stuck(), batch_size=None, num_workers=2, multiprocessing_context=worker_context(2)))
    pids = [w.pid for w in it._workers]
    assert len([next(it), next(it)]) == 2
    t0 = time.monotonic()
    it._shutdown_workers()  # joins for 5 s, then terminate(): SIGKILL for these workers
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status()
                                              != psutil.STATUS_ZOMBIE for p in pids):
        time.sleep(0.1)
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"workers {alive} outlived their loader"
    assert time.monotonic() - t0 < 15


def _group_members(pgid: int) -> list[str]:
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid}: {' '.join(p.info['cmdline'] or [])[:200]}")
        except (ProcessLookupError, psutil.Error):
            continue
    return out


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sigterm_to_the_process_group_of_a_deepspeed_launch_checkpoints_and_resumes(tmp_path):
    from train_driver import read_until
    from train_driver import caption_data, finish, launch, metrics, start, tiny_overrides

    steps = 10
    data = caption_data(tmp_path / "data", corrupt=False)
    overrides = tiny_overrides(data, steps=steps, extra=["--data.workers=2", "--logging.mlflow=false"])
    run_dir = tmp_path / "run"
    proc, t0 = start(run_dir, overrides, launcher="cli"), time.monotonic()
    text, _ = read_until(proc, rf"step 2/{steps} ")
    os.killpg(proc.pid, signal.SIGTERM)  # scancel / preemption / time limit: every process of the job
    first = finish(proc, run_dir, t0, 180, text)  # the output pipe closes when every process is gone
    left = _group_members(proc.pid)
    assert not left, f"processes of the launch still running: {left}"
    assert "exited unexpectedly" not in first.output, first.output[-4000:]
    m = re.search(r"preempted: checkpoint saved at step (\d+) \(SIGTERM, exit (\d+)\)", first.output)
    assert m, first.output[-4000:]
    saved, code = int(m.group(1)), int(m.group(2))
    assert code == EXIT_PREEMPTED_TERM == 143 and 2 <= saved < steps
    tag = run_dir / "checkpoints" / f"step_{saved:08d}"
    assert (tag / "COMPLETE").is_file(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())

    second = launch(run_dir, overrides, timeout=240)  # the resume itself is not about the launcher
    assert second.rc == 0, second.output[-4000:]
    assert f"resumed from {tag}" in second.output, second.output[-4000:]
    assert max(metrics(run_dir)) == steps
    assert (run_dir / "checkpoints" / f"step_{steps:08d}" / "COMPLETE").is_file()
