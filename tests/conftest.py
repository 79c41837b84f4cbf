"""Suite-wide test settings: quiet, offline, CPU-friendly environment for every test process.

Run the whole suite with ``make test`` (sets everything up first) or
``.venv/bin/python -m pytest -q tests``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Set before anything imports these libraries (children inherit them too).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home at import
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fork-after-use warnings from HF tokenizers
os.environ.setdefault("WANDB_MODE", "disabled")  # img2dataset imports wandb
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# DeepSpeed's JIT ops (shm all-reduce, CPU Adam) live with the virtualenv that built them:
# scripts/setup.sh pre-builds them there, and another checkout sharing ~/.cache cannot
# rebuild them under a running test (pretrain/train/ds_ops.py says why).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        return False


if not _cuda_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly on machines without CUDA."""
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread in the test process: tiny models gain nothing from more, and on a
    small shared machine oversubscription (test process + spawned ranks) slows steps 10x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
