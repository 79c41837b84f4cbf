"""The default near-duplicate threshold on a small labelled Fashion-MNIST set (the
benchmark's generator, benchmarks/bench_neardup_precision.py): re-encodes and resizes are
always caught, no two different garments are merged, overall recall above the floor
measured at 300 images (0.755 at t = 4; crops of 3-6 % are the misses).

Run: .venv/bin/python -m pytest -q tests/test_filter_neardup_precision.py   (~10 s)
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_neardup_precision as bench  # noqa: E402

from data_pipeline.filter import FilterConfig  # noqa: E402


@pytest.mark.skipif(not bench.FMNIST.exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_default_threshold_precision_and_recall() -> None:
    false, true, _ = bench.labelled_distances(120)
    t = FilterConfig().dedup.phash_distance
    row = bench.table(false, true, [t])[0]
    assert row["precision"] >= 0.99 and row["fp_rate"] <= 2e-4, row
    assert row["recall"] >= 0.70, row
    for v in ("jpeg_q30", "jpeg_q50", "jpeg_q90", "resize_160", "resize_112"):
        assert row[v] == 1.0, (v, row)
    assert row["watermark"] >= 0.75, row
