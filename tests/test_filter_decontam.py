"""Decontamination (filter.eval_overlap): a training sample whose picture is in the eval
set (here a JPEG re-encode of it) is dropped as filter/eval_overlap, before duplicate
removal; an unreadable eval folder is a clear error.

Run: .venv/bin/python -m pytest -q tests/test_filter_decontam.py   (~5 s)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_pipeline.filter import FilterConfig, filter_stage, global_pass
from data_pipeline.filter.decontam import eval_overlap_mask
from test_filter_stage import build_dataset
from test_filter_support import distinct_indices, encode, real_image


def test_eval_overlap_drops_and_counts(tmp_path: Path) -> None:
    tars, _ = build_dataset(tmp_path)
    work = tmp_path / "work"
    base = filter_stage(tars, str(work), FilterConfig())
    evals = tmp_path / "eval"
    evals.mkdir()
    d = distinct_indices(16)
    (evals / "x.jpg").write_bytes(encode(real_image(d[4]), quality=70))
    (evals / "notes.txt").write_text("not an image: ignored by extension")
    r = global_pass(str(work), FilterConfig.from_dict({"eval_overlap": {"eval_images": str(evals)}}))
    assert r.counts["filter/eval_overlap"] == 1
    assert len(r.kept) == len(base.kept) - 1
    gone = set(base.kept["key"]) - set(r.kept["key"])
    assert gone == {"000000004"}
    with pytest.raises(FileNotFoundError, match="eval_images"):
        global_pass(str(work), FilterConfig.from_dict({"eval_overlap": {"eval_images": str(tmp_path / "nope")}}))


def test_mask_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    ev = rng.integers(0, 2**64, size=50, dtype=np.uint64, endpoint=False)
    tr = rng.integers(0, 2**64, size=2000, dtype=np.uint64, endpoint=False)
    tr[:50] = ev ^ (np.uint64(1) << rng.integers(0, 64, 50).astype(np.uint64))
    tr[50:60] = ev[:10]
    for dist in (0, 1, 4):
        want = np.array([min(bin(int(t) ^ int(e)).count("1") for e in ev) <= dist for t in tr])
        assert (eval_overlap_mask(tr, ev, dist) == want).all()
