"""The Slurm launcher on a real two-node Slurm cluster (tests/slurm_cluster.py): the CPU
variant (slurm/cpu_tiny.sh: tiny ResNet, 2 nodes x 1 task, gloo, real DeepSpeed trainer)
submitted with sbatch
  (a) trains to completion;
  (b) sent the time-limit warning (`scancel --signal=USR1 --batch`, what `--signal=B:USR1@T`
      delivers), checkpoints, requeues itself, resumes and ends at the same step with the
      same weights as the uninterrupted run (a);
  (c) with one rank SIGKILLed, fails within a minute, and a resubmission under the same job
      name resumes from the newest complete checkpoint and finishes.
Skipped where Slurm cannot be installed or started (CLIP_SLURM_REQUIRED=1 makes that fail).

    .venv/bin/python -m pytest -q tests/test_slurm_jobs.py
"""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from shard_factory import make_caption_shards
from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (the fixture)

from pretrain.modelio import complete_tags, consolidated_state_dict

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "cpu_tiny.sh"
TOTAL_STEPS = 30  # slurm/presets/cpu_tiny.yaml: 240 samples / 16 per step x 2 epochs
FINAL_TAG = f"step_{TOTAL_STEPS:08d}"
# The trainer's test hook: a NaN loss at step 2 (rank 0) must be skipped and counted on
# the Slurm path too; given to runs (a) and (b) alike, so their weights stay comparable.
NAN_AT_2 = "--train.debug_nan_at_steps=[2]"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slurm_jobs")
    shards = make_caption_shards(root / "data", n_shards=4, per_shard=48, image_px=48)
    return {"root": root, "runs": root / "runs", "data": Path(shards.pattern)}


def submit(cluster: SlurmCluster, work: dict[str, Path], name: str, *overrides: str, preflight: bool = False,
           data_as_argument: bool = False) -> int:
    """sbatch the CPU variant under job name `name` (= its run dir under work["runs"]), with
    the shards from CLIP_DATA or as a `--data.sources=/...` script argument (a path in the
    arguments must not confuse how the script finds the repository). The one-process
    preflight check (~5 s of imports here) runs in the first job only."""
    env = {"CLIP_RUNS_ROOT": str(work["runs"]), "CLIP_PREFLIGHT": "1" if preflight else "0"}
    if data_as_argument:
        overrides = (f"--data.sources={work['data']}", *overrides)
    else:
        env["CLIP_DATA"] = str(work["data"])
    return cluster.sbatch(SCRIPT, *overrides, cwd=REPO, env=env,
                          sbatch_args=[f"--job-name={name}", f"--output={work['root']}/%x-%j.out"])


def rank_log(work: dict[str, Path], name: str, job: int, attempt: int, rank: int) -> str:
    """Per-rank log written by srun --output=<run>/logs/<job>.<attempt>-<rank>.log."""
    return (work["runs"] / name / "logs" / f"{job}.{attempt}-{rank}.log").read_text(errors="replace")


def batch_log(work: dict[str, Path], name: str, job: int) -> str:
    return (work["root"] / f"{name}-{job}.out").read_text(errors="replace")


def wait_for_checkpoint(cluster: SlurmCluster, job: int, run: Path, timeout: float = 150) -> list[str]:
    """Block until the run has a complete checkpoint (so the trainer is mid-training)."""
    deadline = time.monotonic() + timeout
    while not (run / "checkpoints").is_dir() or not complete_tags(run):
        state = cluster.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING"), f"job {job} ended ({state}) before its first checkpoint"
        assert time.monotonic() < deadline, f"no complete checkpoint in {run} after {timeout} s"
        time.sleep(0.2)
    return complete_tags(run)


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    a, b = consolidated_state_dict(run_a, FINAL_TAG), consolidated_state_dict(run_b, FINAL_TAG)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def straight_run(slurm_cluster: SlurmCluster, work) -> dict:  # noqa: F811
    """(a): one uninterrupted submission of the CPU variant."""
    name = "clip-straight"
    job = submit(slurm_cluster, work, name, NAN_AT_2, preflight=True)
    info = slurm_cluster.wait_done(job, timeout=240)
    return {"name": name, "job": job, "info": info, "run": work["runs"] / name}


@pytest.mark.timeout(300)
def test_cpu_variant_trains_to_completion(straight_run, work):
    name, job, info, run = (straight_run[k] for k in ("name", "job", "info", "run"))
    log0 = rank_log(work, name, job, 0, 0)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", batch_log(work, name, job) + log0[-3000:]
    assert "process group: gloo, world size 2, device cpu (launcher: slurm)" in log0
    assert f"training finished at step {TOTAL_STEPS}" in log0
    assert "step 2: non-finite loss; update skipped (1 in a row)" in log0
    assert (run / "logs" / f"{job}.0-1.log").is_file()  # rank 1 ran on the other "node"
    assert complete_tags(run)[-1] == FINAL_TAG
    batch = batch_log(work, name, job)
    assert "preflight: world 2 x micro-batch 8 x accumulation 1 = global batch 16" in batch
    assert "rendezvous n1:" in batch  # MASTER_ADDR = first node of the list
    losses = [float(m) for m in re.findall(r"step \d+/\d+ loss ([\d.]+)", log0)]
    assert len(losses) == TOTAL_STEPS // 5 and losses[-1] < losses[0]  # it learned something


@pytest.mark.timeout(400)
def test_warning_signal_checkpoints_requeues_and_resumes(slurm_cluster, work, straight_run):  # noqa: F811
    name = "clip-preempted"
    run = work["runs"] / name
    job = submit(slurm_cluster, work, name, NAN_AT_2)
    wait_for_checkpoint(slurm_cluster, job, run)
    # What `#SBATCH --signal=B:USR1@60` does at the time limit: USR1 to the batch shell only.
    slurm_cluster.cmd("scancel", "--signal=USR1", "--batch", str(job))
    slurm_cluster.wait_requeued(job, timeout=90)
    info = slurm_cluster.wait_done(job, timeout=240, restarts=1)
    first, second = rank_log(work, name, job, 0, 0), rank_log(work, name, job, 1, 0)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", batch_log(work, name, job) + second[-3000:]
    saved = re.search(r"preempted: checkpoint saved at step (\d+)", first)
    assert saved, f"attempt 0 did not report a preemption checkpoint:\n{first[-3000:]}"
    step = int(saved.group(1))
    assert 0 < step < TOTAL_STEPS
    assert f"resumed from {run / 'checkpoints' / f'step_{step:08d}'}" in second
    assert f"training steps {step + 1}..{TOTAL_STEPS} of {TOTAL_STEPS}" in second
    assert f"training finished at step {TOTAL_STEPS}" in second
    batch = batch_log(work, name, job)
    assert "USR1" in batch and "checkpoint saved: requeueing job" in batch and "attempt 1" in batch
    # Same final step count and, with exact resume, the same weights as the straight run.
    assert complete_tags(run)[-1] == FINAL_TAG
    assert_same_weights(straight_run["run"], run)


@pytest.mark.timeout(400)
def test_killed_rank_fails_fast_and_resubmission_resumes(slurm_cluster, work):  # noqa: F811
    name = "clip-killed"
    run = work["runs"] / name
    job = submit(slurm_cluster, work, name, data_as_argument=True)
    wait_for_checkpoint(slurm_cluster, job, run)
    pids = slurm_cluster.task_pids(job, procid=1, needle="pretrain/run.py")
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)  # rank 1 dies as under the OOM killer
    killed_at = time.monotonic()
    info = slurm_cluster.wait_done(job, timeout=60)  # raises if the job is still running
    assert time.monotonic() - killed_at < 60
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info
    assert "srun exited with status" in batch_log(work, name, job)
    newest = complete_tags(run)[-1]  # what survived: complete tags only
    assert newest != FINAL_TAG

    again = submit(slurm_cluster, work, name, data_as_argument=True)  # same job name -> same run dir
    info = slurm_cluster.wait_done(again, timeout=240)
    log0 = rank_log(work, name, again, 0, 0)
    assert info["JobState"] == "COMPLETED", batch_log(work, name, again) + log0[-3000:]
    assert f"resumed from {run / 'checkpoints' / newest}" in log0
    assert f"training finished at step {TOTAL_STEPS}" in log0
    assert complete_tags(run)[-1] == FINAL_TAG
