"""benchmarks/gpu_side_by_side.py --dry-run: our side runs the real trainer step with the
fast switches and a pass-through override, and the open_clip side says why it is skipped.

Run: `.venv/bin/python -m pytest -q tests/test_gpu_side_by_side.py`.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_dry_run_measures_our_side_and_explains_the_skip(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_side_by_side.py"), "--dry-run", "--fast",
                          "--override", "train.tf32=false", "--models", "RN50", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=190, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "our overrides: optimizer.kernel=fused train.cudnn_benchmark=true train.tf32=false" in text
    row = re.search(r"^\| RN50 \| 8 \| ([0-9.]+) \|.*\| skipped \|", text, re.M)
    assert row and float(row.group(1)) > 0, text
    assert "open_clip side skipped: " in text


def test_unknown_override_is_refused(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_side_by_side.py"), "--dry-run",
                          "--override", "optimizer.kernel=turbo", "--models", "RN50", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode != 0 and "optimizer.kernel" in out.stderr
