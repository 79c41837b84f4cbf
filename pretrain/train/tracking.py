"""MLflow tracking of a run, on rank 0 only, off the training thread.

- Tracking URI: `logging.tracking_uri`, else `$MLFLOW_TRACKING_URI`, else
  `sqlite:///<run dir>/mlflow.db` (artifacts then go to `<run dir>/mlartifacts`).
- Params: the flattened run config. A resumed run continues the same MLflow run (its id is
  kept in the checkpoint's client state and in `<run dir>/mlflow_run_id.txt`); params that
  already exist are not logged again (MLflow refuses to change a param), a changed value
  is reported in the log.
- Metrics go through a queue to a background thread that sends them with `log_batch`
  about once a second (a sqlite `log_metric` call costs ~23 ms: MACHINE.md).

Open the dashboard: `mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db`.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from pathlib import Path

from pretrain import fs

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id.txt"
_MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per call


def default_tracking_uri(run_dir: Path, configured: str) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"


class Tracker:
    """No-op unless `enabled` (rank 0 with logging.mlflow)."""

    def __init__(self, enabled: bool, run_dir: str | Path, tracking_uri: str = "", experiment: str = "clip-pretrain",
                 run_name: str = "", flush_s: float = 1.0) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.uri = default_tracking_uri(self.run_dir, tracking_uri) if enabled else ""
        self.experiment = experiment
        self.run_name = run_name or self.run_dir.name
        self.flush_s = flush_s
        self.run_id: str | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._client = None
        self._error: BaseException | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, params: dict[str, str], run_id: str | None = None) -> str | None:
        """Create (or reopen `run_id`, else the id in the run dir) the MLflow run; log params."""
        if not self.enabled:
            return None
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self._client = MlflowClient(tracking_uri=self.uri)
        id_file = self.run_dir / RUN_ID_FILE
        run_id = run_id or (id_file.read_text().strip() if id_file.is_file() else None)
        existing: dict[str, str] = {}
        if run_id:
            self._client.update_run(run_id, status="RUNNING")
            existing = dict(self._client.get_run(run_id).data.params)
            log.info("mlflow: continuing run %s at %s", run_id, self.uri)
        else:
            exp = self._client.get_experiment_by_name(self.experiment)
            if exp is not None:
                exp_id = exp.experiment_id
            else:
                location = (self.run_dir / "mlartifacts").resolve().as_uri() if self.uri.startswith("sqlite:") else None
                exp_id = self._client.create_experiment(self.experiment, artifact_location=location)
            run_id = self._client.create_run(exp_id, run_name=self.run_name).info.run_id
            log.info("mlflow: run %s in experiment %r at %s", run_id, self.experiment, self.uri)
        self.run_id = run_id
        fs.write_text(id_file, run_id + "\n")
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v[:6000])
        if changed:
            log.warning("mlflow: params changed since the run started, kept at their first values: %s", changed)
        new = [Param(k[:250], v[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self._client.log_batch(run_id, params=new[i:i + 100])
        self._thread = threading.Thread(target=self._drain, name="mlflow-logger", daemon=True)
        self._thread.start()
        return run_id

    def close(self, status: str = "FINISHED") -> None:
        """Flush queued metrics and end the run with `status` (FINISHED, KILLED, FAILED)."""
        if not self.enabled or self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout=60)
        self._thread = None
        if self._error is not None:
            log.warning("mlflow: metrics logging failed: %r", self._error)
        self._client.set_terminated(self.run_id, status=status)

    # --- logging ---------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics (non-finite values are dropped: MLflow stores them poorly)."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        if batch:
            self._queue.put(batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def _drain(self) -> None:
        stop = False
        while not stop:
            pending = []
            try:
                item = self._queue.get(timeout=self.flush_s)
                while True:
                    if item is None:
                        stop = True
                        break
                    pending.extend(item)
                    item = self._queue.get_nowait()
            except queue.Empty:
                pass
            for i in range(0, len(pending), _MAX_BATCH):
                try:
                    self._client.log_batch(self.run_id, metrics=pending[i:i + _MAX_BATCH], synchronous=True)
                except Exception as exn:  # noqa: BLE001 - tracking must never stop training
                    self._error = exn
