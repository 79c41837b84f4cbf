"""The efficiency ratio of benchmarks/compare_objectives.py (images to the same zero-shot
accuracy, the CLIP paper's Figure 2) on hand-made curves, and its plot and table files.

Run: `.venv/bin/python -m pytest -q tests/test_compare_objectives.py`.
"""
from __future__ import annotations

import importlib.util
from argparse import Namespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def co():
    spec = importlib.util.spec_from_file_location("compare_objectives", REPO / "benchmarks" / "compare_objectives.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_images_to_reach_interpolates_between_evaluations(co):
    pts = [(1000, 0.12), (2000, 0.20), (3000, 0.30)]
    assert co.images_to_reach(pts, 0.16) == (1500.0, True)
    assert co.images_to_reach(pts, 0.10) == (1000.0, False)  # already there at the first evaluation
    assert co.images_to_reach(pts, 0.5) == (None, True)


def test_ratio_exact_lower_bound_and_never(co):
    curves = {"captioning": [(1000, 0.12), (2000, 0.2), (3000, 0.3)], "bow": [(1000, 0.2), (2000, 0.35)],
              "clip": [(1000, 0.4), (2000, 0.5)]}
    r = co.ratio(curves, "captioning", "bow", 0.1)
    assert r["level"] == 0.3 and r["fast_images"] == pytest.approx(1000 + 1000 * 0.1 / 0.15)
    assert r["ratio"] == pytest.approx(3000 / r["fast_images"]) and not r["lower_bound"]
    r = co.ratio(curves, "bow", "clip", 0.1)
    assert r["ratio"] == 2.0 and r["lower_bound"]  # clip is past 35% at its first evaluation
    flat = {"bow": [(1000, 0.1), (2000, 0.1)], "clip": [(1000, 0.1), (2000, 0.3)]}
    r = co.ratio(flat, "bow", "clip", 0.1)  # bow charged every image it saw, at 1.5x chance
    assert r["ratio"] == pytest.approx(2000 / 1250) and r["lower_bound"] and "never" in r["note"]
    assert co.ratio({"bow": [(1, 0.1)], "clip": [(1, 0.1)]}, "bow", "clip", 0.1)["ratio"] is None


def test_plot_and_table_are_written(co, tmp_path):
    curves = {"clip": [(640, 0.3), (1280, 0.5)], "bow": [(640, 0.2), (1280, 0.3)],
              "captioning": [(640, 0.1), (1280, 0.2)]}
    ratios = {pair: co.ratio(curves, *pair, 0.1) for pair in co.PAPER}
    co.plot(curves, ratios, tmp_path / "o.png", 0.1, "t")
    assert (tmp_path / "o.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    args = Namespace(eval_limit=100, templates="auto", global_batch=64, steps=20)
    md = co.markdown(curves, ratios, args, {"clip": 60.0}, "# machine", "packaged:fashion-mnist", 900)
    assert "| contrastive (CLIP) | 30.0 | 50.0 | 1.0 |" in md and "| 3x |" in md and "| 4x |" in md
