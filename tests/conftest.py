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
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow >= 3 reports usage to its own endpoint
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


SHM_DIR = Path("/dev/shm")
SHM_GLOB = "deepspeed_allreduce_buffer_*"
_SHM_AT_START = {p.name for p in SHM_DIR.glob(SHM_GLOB)} if SHM_DIR.is_dir() else set()


@pytest.fixture(autouse=True)
def _no_deepspeed_shm_left():
    """Safety net: DeepSpeed never unlinks its CPU all-reduce workspaces (66 MB of RAM per rank
    in /dev/shm). The trainer unlinks its own (pretrain/train/distributed.py); whatever a
    killed or hand-made process group of a test leaves is removed after that test, when none
    of its processes can still be mapping it."""
    yield
    if SHM_DIR.is_dir():
        for p in SHM_DIR.glob(SHM_GLOB):
            if p.name not in _SHM_AT_START:
                p.unlink(missing_ok=True)


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
