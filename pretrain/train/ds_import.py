"""Import DeepSpeed without the MLflow import its autotuner does at import time.

`import deepspeed` reaches ``deepspeed.autotuning.autotuner``, which runs ``import mlflow``
(when installed) only to log autotuning experiments (`deepspeed --autotuning`), a feature this
trainer never uses. MLflow's import pulls in pandas and more: ~1.7 CPU-seconds per process
on a 2-core x86 CPU, paid by every rank of every launch, although only rank 0 tracks (and
only with `logging.mlflow=true`; pretrain/train/tracking.py imports MLflow itself then).

    from pretrain.train.ds_import import import_deepspeed
    deepspeed = import_deepspeed()     # first import in the process; later ones are free

pretrain/train/__init__.py calls it, so importing any module of the trainer (the ranks of
pretrain/run.py, a test's spawned ranks) does it first.

While DeepSpeed is imported, ``sys.modules["mlflow"]`` is ``None`` (Python then raises
ImportError for ``import mlflow``, which the autotuner catches: ``has_mlflow = False``); the
entry is removed right after, so MLflow imports normally afterwards. Where MLflow or DeepSpeed
is already imported this does nothing special.
"""
from __future__ import annotations

import sys
from types import ModuleType


def import_deepspeed() -> ModuleType:
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # type: ignore[assignment]
    try:
        import deepspeed
    finally:
        if "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]
    return deepspeed
