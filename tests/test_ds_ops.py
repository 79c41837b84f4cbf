"""DeepSpeed op pre-build helpers (pretrain/train/ds_ops.py).

Run: `.venv/bin/python -m pytest -q tests/test_ds_ops.py`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from pretrain.train import ds_ops


def test_stale_locks_removed_at_both_layouts(tmp_path, monkeypatch):
    # <dir>/<op>/lock (TORCH_EXTENSIONS_DIR set) and <dir>/py311_cpu/<op>/lock (torch's default)
    flat = tmp_path / "cpu_adam" / "lock"
    nested = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    keep = tmp_path / "cpu_adam" / "cpu_adam.so"
    for p in (flat, nested, keep):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert ds_ops.extensions_dir() == tmp_path
    assert ds_ops.remove_stale_locks(tmp_path) == sorted([flat, nested])
    assert not flat.exists() and not nested.exists() and keep.exists()


def test_suite_uses_the_virtualenvs_prebuilt_ops():
    # conftest points the cache into the running virtualenv, where scripts/setup.sh built the
    # ops; a shared ~/.cache could be rebuilt by another checkout under a running test.
    root = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    assert root == Path(sys.prefix) / "torch_extensions"
    assert ds_ops.extensions_dir() == root


def test_build_only_loads_the_cached_ops():
    # After set-up the ops only load: a rebuild (new .so) would mean the cache key moved and
    # every launch would compile again.
    root = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.so")}
    assert {p.name for p in before} >= {"deepspeed_shm_comm.so", "cpu_adam.so"}
    assert set(ds_ops.build()) == {"deepspeed_shm_comm", "cpu_adam"}
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.so")} == before
