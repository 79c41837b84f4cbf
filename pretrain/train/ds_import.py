"""Import and initialise DeepSpeed without the imports of features this trainer never uses.

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

`deepspeed.initialize` with ZeRO (any stage) checks the client optimizer against ZeRO's
supported list, and first imports ``deepspeed.runtime.zero.muon.muon_optimizer`` to add
Muon to that list (deepspeed/runtime/zero/utils.py, ``is_zero_supported_optimizer``). That
module decorates its kernels with ``torch.compile``, which imports TorchInductor: ~0.8
CPU-seconds per rank on a 2-core x86 CPU, for an optimizer this trainer never builds (its
optimizers, pretrain/train/optim.py, are all on the list already). ``without_muon()``
around the call makes that import fail the way DeepSpeed expects when Muon is absent
(ImportError, caught there); the list check itself is unchanged.

    with without_muon():
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


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


@contextmanager
def without_muon() -> Iterator[None]:
    """While inside, ``import`` of DeepSpeed's Muon module raises ImportError (unless it is
    already imported: then nothing changes)."""
    if MUON in sys.modules:
        yield
        return
    sys.modules[MUON] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get(MUON, 0) is None:
            del sys.modules[MUON]
