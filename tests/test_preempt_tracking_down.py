"""A preempted run whose MLflow tracking server is down still checkpoints and exits with the
code the Slurm scripts act on; no credential reaches its log or the tracking store.

One trainer process (what srun starts per task: its exit code is the task's) with 2 DataLoader
workers reads its shards from a loopback HTTP server through presigned-looking URLs
(`...tar?X-Amz-Credential=...&X-Amz-Signature=...`) and tracks to a real `mlflow server` on
127.0.0.1 addressed with userinfo (`http://user:password@127.0.0.1:PORT`). Mid-run the
tracking server is SIGKILLed; then the whole process group gets SIGTERM (what Slurm's
preemption and time limit send; exit 143). The run saves its checkpoint, logs the preemption
line, exits with that code; with the server still down, the next start resumes and finishes.
(SIGUSR1, the batch scripts' warning signal, ends in the same preemption path with exit 0:
tests/test_preempt_signal.py and tests/test_slurm_jobs.py check that code.)

Run: `.venv/bin/python -m pytest -q tests/test_preempt_tracking_down.py`
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from shard_factory import make_caption_shards
from mlflow_server import MlflowServer
from test_mlflow_tracking import SECRETS, _assert_clean
from train_driver import read_until
from train_driver import REPO, _env, finish, metrics, tiny_overrides

from data_pipeline.serve import ImageServer
from pretrain.train.distributed import free_port
from pretrain.train.preempt import EXIT_PREEMPTED_TERM

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
STEPS = 12


def _start(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "pretrain" / "run.py"), f"--output_dir={run_dir}", *overrides],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_preempted_run_with_the_tracking_server_down(tmp_path):
    sig, code = signal.SIGTERM, EXIT_PREEMPTED_TERM
    shards = make_caption_shards(tmp_path / "data" / "train", n_shards=4, per_shard=48, image_px=32)
    server = MlflowServer(tmp_path / "mlflow", free_port())
    server.root.mkdir()
    server.start()
    try:
        with ImageServer(str(tmp_path / "data")) as data_srv:
            presigned = ("?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIASEKRET%2F20260101"
                         "&X-Amz-Signature=SEKRETSIG")
            url = shards.pattern.replace(str(tmp_path / "data") + "/", data_srv.url("")) + presigned
            data = type("D", (), {"train_manifest": url})()
            overrides = tiny_overrides(data, steps=STEPS, extra=[
                "--data.workers=2", f"--logging.tracking_uri={server.url.replace('http://', 'http://user:SEKRETPW@')}",
                "--logging.experiment=outage"])
            run_dir = tmp_path / "run"
            proc, t0 = _start(run_dir, overrides), time.monotonic()
            text, _ = read_until(proc, rf"step 2/{STEPS} ")
            server.kill()  # the tracking server dies mid-run
            more, _ = read_until(proc, rf"step 4/{STEPS} ")
            os.killpg(proc.pid, sig)  # every process of the task: trainer, fork server, workers
            first = finish(proc, run_dir, t0, 180, text + more)
            assert first.rc == code, first.output[-4000:]
            m = re.search(rf"preempted: checkpoint saved at step (\d+) \({sig.name}, exit {code}\)", first.output)
            assert m, first.output[-4000:]
            saved = int(m.group(1))
            tag = run_dir / "checkpoints" / f"step_{saved:08d}"
            assert (tag / "COMPLETE").is_file()
            assert "mlflow: log_batch failed" in first.output or "mlflow: log_artifact failed" in first.output
            _assert_clean(first.output, "the trainer's output")
            # the requeued attempt, server still down: resumes, finishes
            second = finish(_start(run_dir, overrides), run_dir, time.monotonic(), 240)
            assert second.rc == 0, second.output[-4000:]
            assert f"resumed from {tag}" in second.output and "mlflow: start failed" in second.output
            assert max(metrics(run_dir)) == STEPS
            _assert_clean(second.output, "the resumed trainer's output")
    finally:
        server.kill()
    # What reached the tracking store before it died: no credential in params or artifacts.
    client = MlflowClient(tracking_uri=server.store)
    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    run = client.get_run(run_id)
    _assert_clean(repr(run.data.params), "MLflow params")
    assert "X-Amz-Signature=***" in run.data.params["data.sources"]
    for path in (tmp_path / "mlflow" / "artifacts").rglob("*"):
        if path.is_file():
            _assert_clean(path.read_text(errors="replace"), f"artifact {path.name}")
    assert any(p.name == "run_config.yaml" for p in (tmp_path / "mlflow" / "artifacts").rglob("*"))
    assert any(s in (run_dir / "run_config.yaml").read_text() for s in SECRETS)  # kept as given in the run dir
