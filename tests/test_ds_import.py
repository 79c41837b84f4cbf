"""pretrain/train/ds_import.py: the trainer's first import brings DeepSpeed in without
MLflow (DeepSpeed's autotuner imports it at import time, ~1.7 CPU-s per rank), and MLflow
imports normally afterwards.

Run: `.venv/bin/python -m pytest -q tests/test_ds_import.py`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A fresh interpreter: this test process may have imported either already.
SCRIPT = r"""
import json, sys
import pretrain.train
seen = {"deepspeed": "deepspeed" in sys.modules, "mlflow_at_import": "mlflow" in sys.modules}
import mlflow
seen["mlflow_importable"] = hasattr(mlflow, "start_run")
print("SEEN " + json.dumps(seen))
"""


def test_trainer_imports_deepspeed_without_mlflow():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=240,
                         env={"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    seen = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("SEEN "))[5:])
    assert seen == {"deepspeed": True, "mlflow_at_import": False, "mlflow_importable": True}, seen
