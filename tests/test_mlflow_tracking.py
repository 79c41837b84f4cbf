"""The trainer's MLflow tracker against a real sqlite MLflow store, read back with MlflowClient.

Run: `.venv/bin/python -m pytest -q tests/test_mlflow_tracking.py`
(tests/test_resume.py checks the same through real training launches).
"""

from __future__ import annotations

import math

import pytest

from pretrain.train.tracking import RUN_ID_FILE, Tracker, default_tracking_uri


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
