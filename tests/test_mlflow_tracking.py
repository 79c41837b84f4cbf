"""The trainer's MLflow tracker against a real sqlite MLflow store and a real `mlflow server` on
loopback, read back with MlflowClient.

- params, batched metrics, artifacts, reopening a run (sqlite store);
- credentials in config values and artifacts are masked before they reach MLflow;
- a tracking server killed mid-run: no call raises or stalls, failures are counted and logged
  once per kind, what was queued is sent once the server is back (restarted on the same
  port and store), with the failure count as the metric `mlflow/failed_calls`.

Run: `.venv/bin/python -m pytest -q tests/test_mlflow_tracking.py`
(tests/test_resume.py checks the same through real training launches,
tests/test_preempt_tracking_down.py a preempted launch whose server is down).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import pytest

from pretrain.train.tracking import FAILED_CALLS_METRIC, RUN_ID_FILE, Tracker, default_tracking_uri

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_harness import free_port  # noqa: E402
from mlflow_server import MlflowServer  # noqa: E402


@pytest.fixture
def mlflow_server(tmp_path):
    root = tmp_path / "mlflow-server"
    root.mkdir()
    server = MlflowServer(root, free_port()).start()
    yield server
    server.kill()


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(tmp_path, "") == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri(tmp_path, "") == "http://127.0.0.1:5000"
    assert default_tracking_uri(tmp_path, "sqlite:////x/db") == "sqlite:////x/db"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_params_batched_metrics_artifacts_and_reopening_the_run(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = Tracker(True, run_dir, experiment="unit", flush_s=0.2)
    run_id = tracker.start({"train.global_batch": "64", "model.name": "RN-tiny"})
    for step in range(1, 121):  # queued, sent in log_batch calls by the background thread
        tracker.log_metrics({"loss": 1.0 / step, "grad_norm": math.inf if step == 7 else 2.0}, step)
    (run_dir / "eval.json").write_text('{"top1": 0.5}')
    tracker.log_artifact(run_dir / "eval.json", "eval")
    tracker.close("KILLED")

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.info.run_name == "run"
    assert run.data.params == {"train.global_batch": "64", "model.name": "RN-tiny"}
    loss = client.get_metric_history(run_id, "loss")
    assert [m.step for m in sorted(loss, key=lambda m: m.step)] == list(range(1, 121))
    assert len(client.get_metric_history(run_id, "grad_norm")) == 119  # the inf was dropped
    assert [a.path for a in client.list_artifacts(run_id, "eval")] == ["eval/eval.json"]
    assert (run_dir / RUN_ID_FILE).read_text().strip() == run_id

    # A resumed process reopens the same run (id from the run dir), keeps the first params.
    again = Tracker(True, run_dir, experiment="unit", flush_s=0.2)
    assert again.start({"train.global_batch": "128", "model.name": "RN-tiny", "train.seed": "1"}) == run_id
    again.log_metrics({"loss": 0.001}, 121)
    again.close()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.global_batch": "64", "model.name": "RN-tiny", "train.seed": "1"}
    assert max(m.step for m in client.get_metric_history(run_id, "loss")) == 121
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_disabled_tracker_does_nothing(tmp_path):
    tracker = Tracker(False, tmp_path)
    assert tracker.start({"a": "1"}) is None
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.close()
    assert list(tmp_path.iterdir()) == []


SECRETS = ("SEKRETPW", "SEKRETSIG", "AKIASEKRET", "SEKRETSAS")


def _assert_clean(text: str, where: str) -> None:
    found = [s for s in SECRETS if s in text]
    assert not found, f"{found} in {where}: {text[:2000]}"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_credentials_never_reach_params_or_artifacts(tmp_path, monkeypatch, caplog):
    from mlflow import MlflowClient

    from pretrain.redact import install_log_redaction

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    install_log_redaction()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sources = ("https://user:SEKRETPW@data.example/{0..3}.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256"
               "&X-Amz-Credential=AKIASEKRET%2F20260101&X-Amz-Signature=SEKRETSIG")
    config = f"data:\n  sources: '{sources}'\n  other: 'https://acct.blob.core.windows.net/c?sv=1&sig=SEKRETSAS'\n"
    (run_dir / "run_config.yaml").write_text(config)
    tracker = Tracker(True, run_dir, experiment="redact", flush_s=0.2)
    with caplog.at_level(logging.INFO):
        run_id = tracker.start({"data.sources": sources, "model.name": "RN-tiny"})
        tracker.log_artifact(run_dir / "run_config.yaml")
        tracker.close()
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    params = client.get_run(run_id).data.params
    _assert_clean(repr(params), "MLflow params")
    assert params["data.sources"].startswith("https://***@data.example/{0..3}.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256")
    logged = Path(client.download_artifacts(run_id, "run_config.yaml", str(tmp_path / "dl"))).read_text()
    _assert_clean(logged, "the run_config artifact")
    assert "X-Amz-Signature=***" in logged and "sig=***" in logged
    assert (run_dir / "run_config.yaml").read_text() == config  # the run dir's copy is kept as given
    _assert_clean(caplog.text, "the log")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_dead_tracking_server_never_fails_or_stalls_the_run(tmp_path, mlflow_server, caplog):
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    uri = mlflow_server.url.replace("http://", "http://user:SEKRETPW@")
    tracker = Tracker(True, run_dir, tracking_uri=uri, experiment="outage", flush_s=0.2, close_timeout_s=20)
    with caplog.at_level(logging.INFO):
        run_id = tracker.start({"train.seed": "0"})
        assert run_id
        for step in range(1, 6):
            tracker.log_metrics({"loss": 1.0 / step}, step)
        time.sleep(1.5)
        mlflow_server.kill()
        t0 = time.monotonic()
        for step in range(6, 11):
            tracker.log_metrics({"loss": 1.0 / step}, step)
        (run_dir / "eval.json").write_text('{"top1": 0.5}')
        tracker.log_artifact(run_dir / "eval.json", "eval")
        assert time.monotonic() - t0 < 1.0  # the training thread never waits for the server
        deadline = time.monotonic() + 60
        while not tracker.failures and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tracker.failures["log_batch"] >= 1, tracker.failures
        time.sleep(3)  # a few more failed attempts while the server is down
        mlflow_server.start()
        deadline = time.monotonic() + 90
        client = MlflowClient(tracking_uri=mlflow_server.url)
        while time.monotonic() < deadline:
            if client.get_metric_history(run_id, FAILED_CALLS_METRIC):
                break
            time.sleep(0.5)
        t0 = time.monotonic()
        tracker.close("KILLED")
        assert time.monotonic() - t0 < 25
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, 11))
    failed = client.get_metric_history(run_id, FAILED_CALLS_METRIC)
    assert failed and failed[-1].value >= 1 and failed[-1].step == 10
    assert [a.path for a in client.list_artifacts(run_id, "eval")] == ["eval/eval.json"]
    # logged once per kind, redacted; the end report counts them
    assert caplog.text.count("mlflow: log_batch failed") == 1, caplog.text[-3000:]
    assert "failed calls in this attempt" in caplog.text
    _assert_clean(caplog.text, "the log")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_server_down_at_close_and_at_start(tmp_path, mlflow_server, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = Tracker(True, run_dir, tracking_uri=mlflow_server.url, experiment="outage", flush_s=0.2,
                      close_timeout_s=15)
    run_id = tracker.start({"a": "1"})
    mlflow_server.kill()
    tracker.log_metrics({"loss": 1.0}, 1)
    (run_dir / "r.yaml").write_text("a: 1\n")
    tracker.log_artifact(run_dir / "r.yaml")
    t0 = time.monotonic()
    tracker.close("KILLED")  # no exception; bounded
    assert time.monotonic() - t0 < 20
    assert tracker.failed_calls() >= 1
    # A new attempt (resume) with the server still down: reopening fails, training goes on.
    again = Tracker(True, run_dir, tracking_uri=mlflow_server.url, experiment="outage", flush_s=0.2,
                    close_timeout_s=5)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert again.start({"a": "1"}) == run_id
        again.log_metrics({"loss": 0.5}, 2)
        again.close()
    assert again.failures["start"] == 1 and time.monotonic() - t0 < 30
    # A fresh run dir while the server is down: no run, tracking off for this attempt.
    fresh = Tracker(True, tmp_path / "fresh", tracking_uri=mlflow_server.url, flush_s=0.2)
    (tmp_path / "fresh").mkdir()
    assert fresh.start({"a": "1"}) is None and not fresh.enabled
    fresh.log_metrics({"loss": 1.0}, 1)
    fresh.close()
