"""benchmarks/gpu_side_by_side.py --dry-run: our side runs the real trainer step with the
fast switches and a pass-through override, the open_clip side says why it is skipped, and
the end-to-end row (JPEG shards through our loader into our step) reports samples/s, a
data-wait fraction in [0, 1] and the loader's CPU cores (> 0).

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
@pytest.mark.timeout(330)
def test_dry_run_measures_our_side_and_explains_the_skip(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_side_by_side.py"), "--dry-run", "--fast",
                          "--override", "train.tf32=false", "--models", "RN50", "--e2e-workers", "1",
                          "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "our overrides: optimizer.kernel=fused train.cudnn_benchmark=true train.tf32=false" in text
    row = re.search(r"^\| RN50 \| 8 \| ([0-9.]+) \|.*\| skipped \|", text, re.M)
    assert row and float(row.group(1)) > 0, text
    assert "open_clip side skipped: " in text
    assert "| workers | e2e samples/s | data-wait fraction | loader cores busy | loader CPU ms/sample |" in text
    e2e = re.search(r"^e2e \| RN50 \| 8 \| 1 \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$",
                    text, re.M)
    assert e2e, text
    rate, wait, cores, ms_per_sample, feed = map(float, e2e.groups())
    assert rate > 0 and 0 <= wait <= 1 and cores > 0 and ms_per_sample > 0 and feed > 0, e2e.group(0)


def test_unknown_override_is_refused(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_side_by_side.py"), "--dry-run",
                          "--override", "optimizer.kernel=turbo", "--models", "RN50", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode != 0 and "optimizer.kernel" in out.stderr
