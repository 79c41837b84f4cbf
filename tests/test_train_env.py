"""Launch-environment detection of pretrain/run.py, and a run started the way `srun` starts
tasks (one process per rank with SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS, no launcher),
with `train.grad_cache` on (the loop's gradient-caching step, pretrain.gradcache).

Run: `.venv/bin/python -m pytest -q tests/test_train_env.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pretrain.train.distributed import detect_env
from train_driver import REPO, caption_data, free_port, metrics, tiny_overrides

_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_LOCALID",
         "SLURM_NTASKS")


@pytest.fixture
def clean_env(monkeypatch):
    for var in _VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_torchrun_and_deepspeed_variables(clean_env):
    clean_env.setenv("RANK", "5")
    clean_env.setenv("WORLD_SIZE", "8")
    clean_env.setenv("LOCAL_RANK", "1")
    env = detect_env(local_rank_arg=3)
    assert (env.rank, env.local_rank, env.world_size, env.launcher) == (5, 1, 8, "env")


def test_deepspeed_local_rank_argument_when_env_lacks_it(clean_env):
    clean_env.setenv("RANK", "1")
    clean_env.setenv("WORLD_SIZE", "2")
    assert detect_env(local_rank_arg=1).local_rank == 1
    assert os.environ["LOCAL_RANK"] == "1"


def test_slurm_variables_are_exported_for_env_init(clean_env):
    clean_env.setenv("SLURM_PROCID", "3")
    clean_env.setenv("SLURM_LOCALID", "1")
    clean_env.setenv("SLURM_NTASKS", "4")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        detect_env()
    clean_env.setenv("MASTER_ADDR", "10.0.0.1")
    clean_env.setenv("MASTER_PORT", "29500")
    env = detect_env()
    assert (env.rank, env.local_rank, env.world_size, env.launcher) == (3, 1, 4, "slurm")
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("3", "1", "4")


def test_single_process_without_launcher(clean_env):
    env = detect_env()
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_srun_style_launch_trains(tmp_path):
    data = caption_data(tmp_path / "shards", corrupt=False)
    run_dir = tmp_path / "run"
    args = [sys.executable, str(REPO / "pretrain" / "run.py"), f"--output_dir={run_dir}",
            *tiny_overrides(data, steps=3, extra=["--logging.mlflow=false", "--train.grad_cache=true"])]
    base = {k: v for k, v in os.environ.items() if k not in _VARS}
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), SLURM_NTASKS="2", OMP_NUM_THREADS="1",
                DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen(args, cwd=REPO, env=dict(base, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "launcher: slurm" in outs[0] and "world size 2" in outs[0]
    assert "gradient caching: 2 chunks of 4 per rank and step" in outs[0]
    rows = metrics(run_dir)
    assert sorted(rows) == [1, 2, 3] and all(r["nonfinite_steps"] == 0 for r in rows.values())


def test_bad_config_exits_with_code_2_before_starting(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "pretrain" / "run.py"), f"--output_dir={tmp_path}",
                           "--data.sources=/x/{0..1}.tar", "--data.samples_per_epoch=64", "--train.zero_stage=0",
                           "--train.precision=bf16"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k not in _VARS})
    assert proc.returncode == 2
    assert "bf16 needs train.zero_stage >= 1" in proc.stdout + proc.stderr


def test_preemption_flag_in_the_trainer_and_default_action_in_forked_workers():
    import signal
    import time

    import torch

    from pretrain.train.preempt import PreemptionFlag

    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        flag = PreemptionFlag()
        assert not flag.requested(torch.device("cpu"))
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # a DataLoader-like worker: SIGTERM must still end it
            os.write(ready_w, b"1")
            time.sleep(30)
            os._exit(0)
        os.read(ready_r, 1)  # the child's interpreter is up (a signal sent during fork is lost)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGUSR1)  # the trainer process itself only raises the flag
        assert flag.requested(torch.device("cpu"))
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
