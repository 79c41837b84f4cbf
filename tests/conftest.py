"""Suite-wide test settings: quiet, offline, CPU-friendly environment for every test process.

Run the whole suite with ``make test`` (sets everything up first) or
``.venv/bin/python -m pytest -q tests``.
"""
from __future__ import annotations

import os
import sys
import time
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


def _mapped_shm_names() -> set[str]:
    """Names under /dev/shm that some live process maps (read from /proc/*/maps)."""
    names: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text(errors="replace")
        except OSError:  # the process ended, or is not ours to read
            continue
        names.update(line.rsplit("/", 1)[-1].removesuffix(" (deleted)")
                     for line in text.splitlines() if f"{SHM_DIR}/" in line)
    return names


@pytest.fixture(autouse=True)
def _no_deepspeed_shm_left():
    """Safety net: DeepSpeed never unlinks its CPU all-reduce workspaces (66 MB of RAM per rank
    in /dev/shm). The trainer unlinks its own (pretrain/train/distributed.py); whatever a
    killed or hand-made process group of a test leaves is removed after that test. Tests run
    in parallel (pytest-xdist), so a workspace that a live process maps, or one created in the
    last seconds (a rank opens its peers' by name, in the window before it maps them), belongs
    to a test still running and stays."""
    yield
    if not SHM_DIR.is_dir():
        return
    left = [p for p in SHM_DIR.glob(SHM_GLOB) if p.name not in _SHM_AT_START]
    if not left:
        return
    mapped, now = _mapped_shm_names(), time.time()
    for p in left:
        try:
            young = now - p.stat().st_mtime < 30
        except FileNotFoundError:
            continue
        if p.name not in mapped and not young:
            p.unlink(missing_ok=True)


# The env:// launch layout. A test that starts a process group in the pytest process (through
# pretrain.train.distributed.detect_env) exports these; restored after every test so that the
# next in-process group on the same worker never inherits another test's rank and world size.
_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_LAUNCH_AT_START = {k: os.environ.get(k) for k in _LAUNCH_VARS}


@pytest.fixture(autouse=True)
def _launch_env_restored():
    yield
    for k, v in _LAUNCH_AT_START.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def pytest_collection_modifyitems(config, items):
    """Files with slow tests first: under pytest-xdist (`make test` runs `-n 3 --dist
    loadfile`: each file on one worker, so its module fixtures are built once) the workers
    then finish together rather than one waiting on a long file sent last. GPU tests skip
    cleanly on machines without CUDA."""
    slow_files = {Path(str(i.fspath)).name for i in items if "slow" in i.keywords}
    items.sort(key=lambda i: Path(str(i.fspath)).name not in slow_files)  # stable: file order kept
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


@pytest.fixture(scope="module")
def mlflow_module_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 for the whole test module (tests/mlflow_server.py),
    killed after it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dist_harness import free_port
    from mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), free_port()).start()
    yield server
    server.kill()
