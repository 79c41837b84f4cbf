"""A real `mlflow server` on 127.0.0.1 for the tests (sqlite store, local artifact root), in its
own session, without its job runner (7 idle task-queue processes, ~1.7 GB, that no test uses).

    from mlflow_server import MlflowServer
    srv = MlflowServer(root, free_port()).start()   # waits for /health
    ... srv.url ...
    srv.kill()                                      # SIGKILL, as a crashed host; start() again reuses the store

Module-scoped servers come from the `mlflow_module_server` fixture (tests/conftest.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from watched import kill_tree


@dataclass
class MlflowServer:
    """`mlflow server` on 127.0.0.1 in its own session (it starts a job runner and consumers)."""

    root: Path
    port: int
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def store(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def start(self, timeout: float = 90) -> "MlflowServer":
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        env.pop("MLFLOW_TRACKING_URI", None)
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", self.store, "--artifacts-destination", str(self.root / "artifacts"),
             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"mlflow server not up after {timeout} s")

    def kill(self) -> None:
        """SIGKILL the server and everything it started (a crashed host, not a clean stop)."""
        if self.proc is not None:
            kill_tree(self.proc)
            self.proc = None
