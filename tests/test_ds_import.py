"""pretrain/train/ds_import.py: DeepSpeed imported without MLflow, and a ZeRO engine built
without DeepSpeed's Muon module (and so without TorchInductor), while ZeRO's own check of the
client optimizer still runs and passes; both modules import normally afterwards.

Run: `.venv/bin/python -m pytest -q tests/test_ds_import.py`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dist_harness import free_port

REPO = Path(__file__).resolve().parents[1]

# A fresh interpreter: this test process may have imported any of these already.
SCRIPT = r"""
import json, sys
sys.path.insert(0, "tests")
import pretrain.train  # the trainer's first import: DeepSpeed, through ds_import
seen = {"mlflow_at_import": "mlflow" in sys.modules}
from pretrain.train.build import build_engine
from pretrain.train.ds_import import MUON
from train_driver import base_config
cfg = base_config(["--model.name=RN-tiny", "--model.overrides.image_size=32", "--train.zero_stage=1",
                   "--train.global_batch=4", "--train.micro_batch=4"])
engine, _ = build_engine(cfg, 1)
seen["optimizer"] = type(engine.optimizer).__name__
seen["muon_after_init"] = MUON in sys.modules
seen["inductor_after_init"] = "torch._inductor.compile_fx" in sys.modules
import importlib
importlib.import_module(MUON)  # not blocked any more
import mlflow
seen["muon_importable"] = MUON in sys.modules and sys.modules[MUON] is not None
seen["mlflow_importable"] = hasattr(mlflow, "start_run")
print("SEEN " + json.dumps(seen))
"""


def test_zero_engine_without_mlflow_or_muon_imports():
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1", LOCAL_SIZE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    seen = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("SEEN "))[5:])
    assert seen == {"mlflow_at_import": False, "optimizer": "DeepSpeedZeroOptimizer", "muon_after_init": False,
                    "inductor_after_init": False, "muon_importable": True, "mlflow_importable": True}, seen
