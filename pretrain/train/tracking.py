"""MLflow tracking of a run, on rank 0 only, off the training thread, never fatal.

- Tracking URI: `logging.tracking_uri`, else `$MLFLOW_TRACKING_URI`, else
  `sqlite:///<run dir>/mlflow.db` (artifacts then go to `<run dir>/mlartifacts`).
- Params: the flattened run config, with credentials in URLs masked (pretrain/redact.py).
  A resumed run continues the same MLflow run (its id is kept in the checkpoint's client
  state and in `<run dir>/mlflow_run_id.txt`); params that already exist are not logged
  again (MLflow refuses to change a param), a changed value is reported in the log.
- Metrics and artifacts go through a queue to a background thread that sends them about
  once a second (a sqlite `log_metric` call costs ~23 ms: docs/cpu_development.md). Text artifacts are uploaded as a
  redacted copy taken when they are queued.
- An unreachable or failing tracking server never stops or stalls training: every failed
  MLflow call is counted by kind (`start`, `log_batch`, `log_artifact`, `set_terminated`),
  the first failure of each kind is logged (redacted), metrics and artifacts wait and are
  retried with a growing pause (at most `_MAX_PENDING` metrics are kept), the count is sent
  as the metric `mlflow/failed_calls` once the server answers again and logged at the end.
  HTTP calls are bounded (`MLFLOW_HTTP_REQUEST_TIMEOUT` 10 s, `MLFLOW_HTTP_REQUEST_MAX_RETRIES`
  2, backoff factor 1, unless set in the environment; MLflow's own defaults are 120 s and 7
  retries with factor 2, minutes per call), and `close()` waits at most `close_timeout_s` for
  the queue before it gives up. A run that could not be created (server down at start)
  trains without tracking for that attempt; metrics.jsonl in the run dir has them all.
- The final model: `log_model` (called by the loop when a run finished, `logging.log_model`)
  logs the newest complete checkpoint as an MLflow pyfunc model that embeds texts and images
  (pretrain/modelio/mlflow_model.py) to the run, as `runs:/<run id>/model`, registered under
  `logging.registered_model_name` when set. Synchronous, after the queue is flushed; skipped
  (with a warning) when the server was unreachable at the last call; a failure is counted
  (`log_model`) and logged, never fatal: `clip-export RUN OUT --format mlflow` writes the
  same model from the run dir later.
- MLflow's usage telemetry is off (`MLFLOW_DISABLE_TELEMETRY=true` unless set).

Open the dashboard: `mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db`.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path

from pretrain import fs
from pretrain.redact import redact

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id.txt"
FAILED_CALLS_METRIC = "mlflow/failed_calls"
_MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per call
_MAX_PENDING = 200_000  # metrics kept while the server is down (oldest dropped beyond)
_RETRY_MAX_S = 60.0  # longest pause between attempts while the server is down
# Set unless the environment says otherwise. MLflow >= 3 also sends usage telemetry to its
# own endpoint by default: a training job inside a cluster sends nothing outside it.
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                   "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def default_tracking_uri(run_dir: Path, configured: str) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"


class Tracker:
    """No-op unless `enabled` (rank 0 with logging.mlflow). No method raises."""

    def __init__(self, enabled: bool, run_dir: str | Path, tracking_uri: str = "", experiment: str = "clip-pretrain",
                 run_name: str = "", flush_s: float = 1.0, close_timeout_s: float = 30.0) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.uri = default_tracking_uri(self.run_dir, tracking_uri) if enabled else ""
        self.experiment = experiment
        self.run_name = run_name or self.run_dir.name
        self.flush_s = flush_s
        self.close_timeout_s = close_timeout_s
        self.run_id: str | None = None
        self.failures: collections.Counter[str] = collections.Counter()
        self.dropped_metrics = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._client = None
        self._down = False  # the last call failed
        self._last_step = 0
        self._tmp: str | None = None

    # --- failures --------------------------------------------------------------------------
    def _failed(self, kind: str, exn: BaseException) -> None:
        self.failures[kind] += 1
        self._down = True
        if self.failures[kind] == 1:
            log.warning("mlflow: %s failed, training goes on (further %s failures are counted, not logged): "
                        "%s: %s", kind, kind, type(exn).__name__, redact(str(exn))[:800])

    def failed_calls(self) -> int:
        return sum(self.failures.values())

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, params: dict[str, str], run_id: str | None = None) -> str | None:
        """Create (or reopen `run_id`, else the id in the run dir) the MLflow run; log params.
        Returns the run id (None when disabled or the run could not be created)."""
        if not self.enabled:
            return None
        for key, value in CLIENT_DEFAULTS.items():
            os.environ.setdefault(key, value)
        id_file = self.run_dir / RUN_ID_FILE
        run_id = run_id or (id_file.read_text().strip() if id_file.is_file() else None)
        try:
            run_id = self._open(run_id, {k: redact(str(v)) for k, v in params.items()})
        except Exception as exn:  # noqa: BLE001 - tracking must never stop training
            self._failed("start", exn)
            if not run_id:
                log.warning("mlflow: no run could be created at %s: this attempt trains without tracking "
                            "(metrics.jsonl has every logged step)", redact(self.uri))
                self.enabled = False
                return None
        self.run_id = run_id
        try:
            fs.write_text(id_file, run_id + "\n")  # atomic: a kill never leaves half an id
        except OSError as exn:
            log.warning("mlflow: could not write %s: %s", id_file, exn)
        self._thread = threading.Thread(target=self._drain, name="mlflow-logger", daemon=True)
        self._thread.start()
        return run_id

    def _open(self, run_id: str | None, params: dict[str, str]) -> str:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self._client = MlflowClient(tracking_uri=self.uri)
        existing: dict[str, str] = {}
        if run_id:
            self._client.update_run(run_id, status="RUNNING")
            existing = dict(self._client.get_run(run_id).data.params)
            log.info("mlflow: continuing run %s at %s", run_id, redact(self.uri))
        else:
            exp = self._client.get_experiment_by_name(self.experiment)
            if exp is not None:
                exp_id = exp.experiment_id
            else:
                location = (self.run_dir / "mlartifacts").resolve().as_uri() if self.uri.startswith("sqlite:") else None
                exp_id = self._client.create_experiment(self.experiment, artifact_location=location)
            run_id = self._client.create_run(exp_id, run_name=self.run_name).info.run_id
            log.info("mlflow: run %s in experiment %r at %s", run_id, self.experiment, redact(self.uri))
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v[:6000])
        if changed:
            log.warning("mlflow: params changed since the run started, kept at their first values: %s", changed)
        new = [Param(k[:250], v[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self._client.log_batch(run_id, params=new[i:i + 100])
        return run_id

    def log_model(self, run_dir: str | Path, tokenizer, step: int, registered_model_name: str = "") -> str | None:
        """Log the run's newest complete checkpoint as an MLflow pyfunc model (see the module
        docstring); returns its model URI, None when skipped or failed. Never raises."""
        if not self.enabled or self._thread is None or not self.run_id:
            return None
        done = threading.Event()
        self._queue.put(("flush", done))  # what is queued goes first (the final step's metrics)
        if not done.wait(self.close_timeout_s):
            self._down = True
        if self._down:
            log.warning("mlflow: the tracking server did not answer the last call: the final model is not logged "
                        "(`clip-export %s OUT --format mlflow` writes it from the checkpoint)", run_dir)
            return None
        try:
            from pretrain.modelio import load_model_from_run
            from pretrain.modelio.mlflow_model import log_mlflow_model

            started = time.monotonic()
            model = load_model_from_run(run_dir, device="cpu")
            info = log_mlflow_model(model, tokenizer, tracking_uri=self.uri, run_id=self.run_id, step=step,
                                    registered_model_name=registered_model_name)
        except Exception as exn:  # noqa: BLE001 - tracking must never fail a finished run
            self._failed("log_model", exn)
            return None
        version = getattr(info, "registered_model_version", None)
        log.info("mlflow: logged the final model as %s (%s)%s in %.1f s", f"runs:/{self.run_id}/model",
                 info.model_uri, f", registered as {registered_model_name} version {version}" if version else "",
                 time.monotonic() - started)
        return info.model_uri

    def close(self, status: str = "FINISHED") -> None:
        """Flush what is queued (at most `close_timeout_s`) and end the run with `status`
        (FINISHED, KILLED, FAILED); report failed calls."""
        if not self.enabled or self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout=self.close_timeout_s)
        if self._thread.is_alive():
            log.warning("mlflow: still sending after %.0f s at close: giving up on what is queued",
                        self.close_timeout_s)
            self._down = True
        self._thread = None
        if self._down:
            log.warning("mlflow: tracking server unreachable at the end: run %s stays RUNNING there (a resumed "
                        "attempt continues it)", self.run_id)
        else:
            try:
                self._client.set_terminated(self.run_id, status=status)
            except Exception as exn:  # noqa: BLE001
                self._failed("set_terminated", exn)
        if self.failures or self.dropped_metrics:
            log.warning("mlflow: %d failed calls in this attempt (%s), %d metrics dropped; training was not "
                        "affected", self.failed_calls(), dict(self.failures), self.dropped_metrics)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    # --- logging ---------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics (non-finite values are dropped: MLflow stores them poorly)."""
        if not self.enabled or self._thread is None:
            return
        from mlflow.entities import Metric

        self._last_step = max(self._last_step, step)
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        if batch:
            self._queue.put(("metrics", batch))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queue a file for upload: a text file as a redacted copy taken now, others as they are."""
        if not self.enabled or self._thread is None:
            return
        path = Path(path)
        try:
            if self._tmp is None:
                self._tmp = tempfile.mkdtemp(prefix="mlflow-artifacts-")
            copy = Path(tempfile.mkdtemp(dir=self._tmp)) / path.name
            try:
                copy.write_text(redact(path.read_text(encoding="utf-8")), encoding="utf-8")
            except UnicodeDecodeError:
                shutil.copyfile(path, copy)
        except OSError as exn:
            self._failed("log_artifact", exn)
            return
        self._queue.put(("artifact", str(copy), artifact_path))

    def _drain(self) -> None:
        metrics: collections.deque = collections.deque()
        artifacts: collections.deque = collections.deque()
        retry_at, pause = 0.0, self.flush_s
        stop = False
        flushed: list[threading.Event] = []
        while True:
            try:
                item = self._queue.get(timeout=self.flush_s)
                while True:
                    if item is None:
                        stop = True
                        break
                    if item[0] == "flush":
                        flushed.append(item[1])
                    else:
                        (metrics if item[0] == "metrics" else artifacts).extend(
                            item[1] if item[0] == "metrics" else [item[1:]])
                    item = self._queue.get_nowait()
            except queue.Empty:
                pass
            while len(metrics) > _MAX_PENDING:
                metrics.popleft()
                self.dropped_metrics += 1
            if (metrics or artifacts) and (stop or flushed or time.monotonic() >= retry_at):
                if self._send(metrics, artifacts):
                    pause = self.flush_s
                else:  # the server is down: wait longer each time, retry what is pending
                    pause = min(max(2 * pause, 1.0), _RETRY_MAX_S)
                    retry_at = time.monotonic() + pause
            for event in flushed:  # one attempt made: the caller reads `_down`
                event.set()
            flushed = []
            if stop:
                return

    def _send(self, metrics: collections.deque, artifacts: collections.deque) -> bool:
        """Send what is pending, oldest first; False at the first failure (the rest waits)."""
        was_down = self._down
        while metrics:
            chunk = [metrics[i] for i in range(min(_MAX_BATCH, len(metrics)))]
            try:
                self._client.log_batch(self.run_id, metrics=chunk, synchronous=True)
            except Exception as exn:  # noqa: BLE001 - tracking must never stop training
                self._failed("log_batch", exn)
                return False
            for _ in chunk:
                metrics.popleft()
        while artifacts:
            local, artifact_path = artifacts[0]
            try:
                self._client.log_artifact(self.run_id, local, artifact_path)
            except Exception as exn:  # noqa: BLE001
                self._failed("log_artifact", exn)
                return False
            artifacts.popleft()
        self._down = False
        if was_down:
            from mlflow.entities import Metric

            log.warning("mlflow: tracking server answers again after %d failed calls (%s)", self.failed_calls(),
                        dict(self.failures))
            metrics.append(Metric(FAILED_CALLS_METRIC, float(self.failed_calls()), int(time.time() * 1000),
                                  self._last_step))
            return self._send(metrics, artifacts)
        return True
