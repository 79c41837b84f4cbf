"""Linear-probe C search, few-shot sampling/table/plot, and template sets of pretrain.eval.

    .venv/bin/python -m pytest -q tests/test_eval_probe.py
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pretrain.eval.fewshot import few_shot, few_shot_markdown, few_shot_plot, sample_k_per_class
from pretrain.eval.linear_probe import class_scores, fit_logreg, linear_probe, search_c, stratified_split
from pretrain.eval.templates import (OPENAI_IMAGENET7_TEMPLATES, OPENAI_IMAGENET_TEMPLATES, TEMPLATE_SETS,
                                     read_template_file, resolve_templates)


def _blobs(n: int, c: int, d: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(size=(c, d))
    y = rng.integers(0, c, n)
    x = centres[y] + noise * rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


def test_stratified_split_is_disjoint_and_per_class() -> None:
    y = np.repeat(np.arange(4), [10, 20, 2, 1])
    tr, va = stratified_split(y, 0.2, seed=0)
    assert not set(tr) & set(va) and len(tr) + len(va) == len(y)
    assert [int((y[va] == c).sum()) for c in range(4)] == [2, 4, 1, 0]  # a 1-item class stays in train


def test_c_search_grid_then_refinement() -> None:
    xtr, ytr = _blobs(600, 5, 16, 1.5, seed=0)
    xva, yva = _blobs(300, 5, 16, 1.5, seed=1)
    found = search_c(xtr, ytr, xva, yva)
    tried = sorted(found.tried)
    assert set(range(-6, 7)) <= set(tried)                          # the decade grid
    best = np.log10(found.C)
    assert -6 <= best <= 6
    assert found.val_accuracy == max(found.tried.values())           # the best of all tried C
    refine = [e for e in tried if e != int(e)]
    assert refine and all(abs(e - round(best)) <= 1 for e in refine)  # refined around the peak
    assert min(abs(e - best) for e in tried if e != best) <= 1 / 8 + 1e-9  # down to 1/8 decade
    assert found.val_accuracy > 0.5


def test_linear_probe_matches_direct_sklearn_fit_with_chosen_c() -> None:
    xtr, ytr = _blobs(800, 6, 16, 1.0, seed=2)
    xte, yte = _blobs(400, 6, 16, 1.0, seed=3)
    res = linear_probe(xtr, ytr, xte, yte, num_classes=6)
    clf = fit_logreg(xtr, ytr, res["C"])  # refit on train+val = all training data
    assert res["top1"] == pytest.approx(float((clf.predict(xte) == yte).mean()))
    assert res["top1"] > 0.8 and res["n_train"] + res["n_val"] == 800


def test_class_scores_mark_classes_missing_from_training() -> None:
    x = np.array([[0.0, 1.0], [1.0, 0.0], [0.1, 0.9], [0.9, 0.1]])
    clf = fit_logreg(x, np.array([0, 2, 0, 2]), C=10.0)  # class 1 never seen
    s = class_scores(clf, x, num_classes=3)
    assert s.shape == (4, 3) and np.isneginf(s[:, 1]).all()
    assert s.argmax(1).tolist() == [0, 2, 0, 2]


def test_few_shot_samples_table_and_plot(tmp_path: Path) -> None:
    y = np.repeat(np.arange(3), 30)
    pool = np.arange(0, 90, 2)
    idx = sample_k_per_class(y, pool, 4, seed=0)
    assert set(idx) <= set(pool) and np.bincount(y[idx]).tolist() == [4, 4, 4]
    assert sample_k_per_class(y, pool, 4, 0).tolist() == idx.tolist()  # seeded
    xtr, ytr = _blobs(300, 3, 8, 0.8, seed=4)
    xte, yte = _blobs(150, 3, 8, 0.8, seed=5)
    rows = few_shot(xtr, ytr, xte, yte, num_classes=3, shots=(1, 4), seeds=2)
    assert [r["k"] for r in rows] == [1, 4] and all(len(r["top1_per_seed"]) == 2 for r in rows)
    assert rows[0]["top1_mean"] == pytest.approx(np.mean(rows[0]["top1_per_seed"]))
    md = few_shot_markdown(rows, zeroshot_top1=0.5)
    assert "| 0 (zero-shot) | 0.5000 |" in md and "| 4 |" in md
    png = few_shot_plot(rows, 0.5, tmp_path / "fs.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_template_sets() -> None:
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80 == len(set(OPENAI_IMAGENET_TEMPLATES))
    assert set(OPENAI_IMAGENET7_TEMPLATES) <= set(OPENAI_IMAGENET_TEMPLATES)
    for name, temps in TEMPLATE_SETS.items():
        assert temps and all(t.count("{}") == 1 for t in temps), name
    assert resolve_templates("auto", "fashion-mnist") == TEMPLATE_SETS["fashion-mnist"]
    assert resolve_templates("auto", "some-folder") == OPENAI_IMAGENET_TEMPLATES
    assert resolve_templates("single") == ["a photo of a {}."]
    assert resolve_templates(["x {} y"]) == ["x {} y"]
    with pytest.raises(ValueError, match="unknown template set"):
        resolve_templates("no-such-set")


def test_template_file(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("# my prompts\na sketch of a {}.\n\n  itap of a {}.  \n")
    assert read_template_file(f) == ["a sketch of a {}.", "itap of a {}."]
    assert resolve_templates(str(f)) == read_template_file(f)
    f.write_text("no placeholder\n")
    with pytest.raises(ValueError, match="exactly one"):
        read_template_file(f)
