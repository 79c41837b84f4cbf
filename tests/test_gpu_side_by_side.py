"""benchmarks/gpu_side_by_side.py --dry-run: our side runs the real trainer step with the
fast switches and a pass-through override; open_clip's side runs the real open_clip training
step in the peer virtualenv (.venv-peer) on the same tiny architecture (the same forward
FLOPs, counted on each side's own model), or says why it is skipped where open_clip is not
importable; the end-to-end row (JPEG shards through our loader into our step) reports
samples/s, a data-wait fraction in [0, 1] and the loader's CPU cores (> 0); a batch list
gives a row per batch.

Run: `.venv/bin/python -m pytest -q tests/test_gpu_side_by_side.py`.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def half_unit(printed: str) -> float:
    """Half a unit of the last printed digit: the most that rounding to `printed` moved it."""
    decimals = len(printed.partition(".")[2])
    return 0.5 * 10.0 ** -decimals


def _dry_run(tmp_path, *extra: str) -> str:
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_side_by_side.py"), "--dry-run", "--fast",
                          "--override", "train.tf32=false", "--out-dir", str(tmp_path), *extra],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_dry_run_measures_both_sides_on_the_same_architecture(tmp_path):
    from peer_env import peer_python

    # One batch: each row costs two child processes (ours, and open_clip in the peer's torch).
    text = _dry_run(tmp_path, "--models", "ViT-B-32", "--batch", "4", "--e2e-workers", "1",
                    "--open-clip-python", str(peer_python()))
    assert "our overrides: optimizer.kernel=fused train.cudnn_benchmark=true train.tf32=false" in text
    for batch in (4,):
        row = re.search(rf"^\| ViT-B-32 \| {batch} \| ([0-9.]+) \| [^|]+ \| [^|]+ \| ([0-9.]+) \| [^|]+ \| [^|]+ "
                        r"\| ([0-9.]+)x \|$", text, re.M)
        assert row, text
        (ours, theirs, ratio), (h_o, h_t, h_r) = map(float, row.groups()), map(half_unit, row.groups())
        # the ratio is of the unrounded rates: it must lie in what the printed digits allow
        assert ours > h_o and theirs > h_t, row.group(0)
        assert (ours - h_o) / (theirs + h_t) - h_r <= ratio <= (ours + h_o) / (theirs - h_t) + h_r, row.group(0)
    flops = re.findall(r"^# ViT-B-32: forward GFLOP/sample ours ([0-9.]+), open_clip ([0-9.]+)$", text, re.M)
    assert len(flops) == 1, text
    for ours, theirs in flops:
        assert float(ours) > 0 and abs(float(ours) - float(theirs)) <= 0.01 * float(ours), flops
    assert "open_clip side skipped" not in text
    # the loader row, once per model
    assert "| workers | e2e samples/s | data-wait fraction | loader cores busy | loader CPU ms/sample |" in text
    e2e = re.findall(r"^e2e \| ViT-B-32 \| 4 \| 1 \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$",
                     text, re.M)
    assert len(e2e) == 1, text
    rate, wait, cores, ms_per_sample, feed = map(float, e2e[0])
    assert rate > 0 and 0 <= wait <= 1 and cores > 0 and ms_per_sample > 0 and feed > 0, e2e


def test_an_interpreter_without_open_clip_is_named_with_the_reason():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_side_by_side import open_clip_missing

    why = open_clip_missing(sys.executable)  # the project's .venv never has open_clip
    assert why and f"open_clip not importable by {sys.executable} (ModuleNotFoundError" in why, why
    assert "scripts/fetch_gpu_wheels.sh" in why
    assert "does not run" in open_clip_missing(str(REPO / "no-such-python"))


def test_unknown_override_is_refused(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_side_by_side.py"), "--dry-run",
                          "--override", "optimizer.kernel=turbo", "--models", "RN50", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode != 0 and "optimizer.kernel" in out.stderr
