"""Exact resume, interrupted checkpoints, preemption and MLflow, every launch under the tests' node
launcher (tests/env_launcher.py; the real `deepspeed` command is launched by tests/test_train_launch.py,
tests/test_preempt_signal.py and tests/test_demo.py).

RN-tiny, ZeRO-2, fp32, 2 ranks x micro-batch 4 x accumulation 2, 16 steps, one DataLoader worker
per rank (whose stream position must be restored too), on shards with a truncated tar and a corrupt JPEG, evaluation and MLflow on:
1. a straight run of 16 steps;
2. the same run interrupted: SIGKILL of the whole job after the checkpoint of step 6; the
   newest complete checkpoint is then damaged (a file truncated, as a cut copy would be);
   the relaunch resumes from the one before; SIGUSR1 sent to rank 1 only mid-run makes both
   ranks save a checkpoint and exit 0 ("preempted: checkpoint saved at step N"); the third
   launch resumes there and finishes.
The interrupted run ends with the straight run's parameters (fp32, 1e-6) and the same
per-step losses after each resume (so the data stream position was restored), in one
MLflow run whose params, metrics and artifacts are read back through MlflowClient.

Run: `.venv/bin/python -m pytest -q tests/test_resume.py`.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import time
from pathlib import Path

import pytest

from train_driver import (caption_data, checkpoint_params, finish, launch, max_abs_diff, metrics, rank_pids,
                          read_until, start, tiny_overrides)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 16


def overrides(data, every: int) -> list[str]:
    extra = [f"--checkpoint.every_steps={every}", "--checkpoint.keep_last=3",
             "--eval.zeroshot_dataset=packaged:fashion-mnist", "--eval.limit=100",
             "--eval.templates=['a photo of a {}.']", f"--eval.retrieval_dataset=captions:{data.val_pattern}",
             "--logging.experiment=resume-test"]
    return tiny_overrides(data, model="RN-tiny", stage=2, precision="fp32", steps=STEPS, workers=1, extra=extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return caption_data(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    return launch(tmp_path_factory.mktemp("straight") / "run", overrides(data, every=4))


@pytest.fixture(scope="module")
def interrupted(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("interrupted") / "run"
    logs = {}
    # 1. killed hard right after the checkpoint of step 6
    proc, t0 = start(run_dir, overrides(data, every=2)), time.monotonic()
    text, _ = read_until(proc, r"checkpoint .*step_00000006 saved")
    os.killpg(proc.pid, signal.SIGKILL)
    logs["killed"] = finish(proc, run_dir, t0, 60, text)
    # the newest complete checkpoint is damaged: a truncated file
    complete = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").exists())
    damaged = complete[-1]
    victim = max((p for p in damaged.iterdir() if p.name.endswith(".pt")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    logs["expected_resume"] = complete[-2].name
    logs["damaged"] = damaged.name
    # 2. resumed, then preempted by SIGUSR1 to rank 1 only
    proc, t0 = start(run_dir, overrides(data, every=2)), time.monotonic()
    text, _ = read_until(proc, r"resumed from")
    more, _ = read_until(proc, r"step \d+/16 ")
    os.kill(rank_pids(proc)[1], signal.SIGUSR1)
    logs["preempted"] = finish(proc, run_dir, t0, 240, text + more)
    # 3. resumed again, runs to the end
    logs["final"] = launch(run_dir, overrides(data, every=2))
    logs["run_dir"] = run_dir
    return logs


def test_straight_run_writes_the_run_files(straight):
    assert straight.rc == 0, straight.output[-4000:]
    run = straight.run_dir
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?\n", (run / "git_sha.txt").read_text())
    ds = json.loads((run / "ds_config.json").read_text())
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 4, 2)
    assert "stage: 2" in (run / "run_config.yaml").read_text()
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [
        "step_00000008", "step_00000012", "step_00000016"]  # keep_last=3
    assert (run / "checkpoints" / "latest").read_text() == "step_00000016"
    assert not (run / "training_curves.png").exists()  # logging.figure=false (tests/train_driver.py)


def test_bad_samples_are_skipped_counted_and_training_goes_on(straight):
    rows = metrics(straight.run_dir)
    assert max(rows) == STEPS and all(math.isfinite(r["loss"]) for r in rows.values())
    assert rows[STEPS]["skipped_samples"] >= 1


def test_interrupted_run_ends_like_the_straight_run(straight, interrupted):
    killed, preempted, final = interrupted["killed"], interrupted["preempted"], interrupted["final"]
    assert killed.rc != 0
    assert f"resumed from {interrupted['run_dir'] / 'checkpoints' / interrupted['expected_resume']}" in preempted.output
    assert f"{interrupted['damaged']}: " in preempted.output and "wrong size" in preempted.output
    assert preempted.rc == 0, preempted.output[-4000:]
    m = re.search(r"preempted: checkpoint saved at step (\d+)", preempted.output)
    assert m and int(m.group(1)) < STEPS, preempted.output[-4000:]
    assert f"resumed from {interrupted['run_dir'] / 'checkpoints' / f'step_{int(m.group(1)):08d}'}" in final.output
    assert final.rc == 0, final.output[-4000:]
    a, b = checkpoint_params(straight.run_dir), checkpoint_params(interrupted["run_dir"])
    assert max_abs_diff(a, b) <= 1e-6
    # Same losses step by step (the last record per step is the one after each resume).
    ra, rb = metrics(straight.run_dir), metrics(interrupted["run_dir"])
    assert sorted(rb) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert rb[s]["loss"] == pytest.approx(ra[s]["loss"], abs=1e-6), f"step {s}"
    assert rb[STEPS]["skipped_samples"] == ra[STEPS]["skipped_samples"]


def _mlflow(run_dir: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    return client, client.get_run(run_id)


def test_mlflow_params_metrics_artifacts(straight):
    client, run = _mlflow(straight.run_dir)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.zero_stage"] == "2" and run.data.params["model.name"] == "RN-tiny"
    assert run.data.params["train.global_batch"] == "16"
    for key in ("loss", "lr", "logit_scale", "samples_per_s", "data_wait_frac", "grad_norm", "skipped_samples",
                "mem_rss_mb", "eval/zeroshot_top1", "eval/retrieval_i2t_r1"):
        assert key in run.data.metrics, key
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    assert client.get_metric_history(run.info.run_id, "skipped_samples")[-1].value >= 1
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"run_config.yaml", "ds_config.json", "eval"} <= names and "figures" not in names  # logging.figure=false
    assert [a.path for a in client.list_artifacts(run.info.run_id, "eval")] == ["eval/step_00000016.json"]


def test_resumed_run_continues_the_same_mlflow_run(interrupted):
    client, run = _mlflow(interrupted["run_dir"])
    run_id = run.info.run_id
    for key in ("preempted", "final"):
        assert f"mlflow: continuing run {run_id}" in interrupted[key].output
    assert run.info.status == "FINISHED"
    steps = sorted({m.step for m in client.get_metric_history(run_id, "loss")})
    assert steps == list(range(1, STEPS + 1))
    assert len(client.search_runs([run.info.experiment_id])) == 1
