"""Metric functions of pretrain.eval against scikit-learn and hand-computed cases.

Tie rule under test: a tie counts against the right answer (see pretrain/eval/metrics.py).

    .venv/bin/python -m pytest -q tests/test_eval_metrics.py
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import recall_score, top_k_accuracy_score

from pretrain.eval.metrics import (classification_metrics, mean_per_class_recall, retrieval_metrics,
                                   topk_accuracy, true_class_rank)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_and_recall_match_sklearn_without_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, c = 500, 12
    scores = rng.normal(size=(n, c))
    labels = rng.integers(0, c, n)
    for k in (1, 3, 5):
        assert topk_accuracy(scores, labels, k) == pytest.approx(
            top_k_accuracy_score(labels, scores, k=k, labels=np.arange(c)))
    assert mean_per_class_recall(scores, labels) == pytest.approx(
        recall_score(labels, scores.argmax(1), average="macro"))
    # torch input gives the same numbers
    assert classification_metrics(torch.from_numpy(scores), torch.from_numpy(labels)) == \
        classification_metrics(scores, labels)


def test_hand_computed_small_case() -> None:
    scores = np.array([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],   # label 0: rank 0
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],   # label 5: rank 5 (last)
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],   # label 1: rank 4
        [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],   # label 2: rank 0
    ])
    labels = np.array([0, 5, 1, 2])
    assert true_class_rank(scores, labels).tolist() == [0, 5, 4, 0]
    m = classification_metrics(scores, labels)
    assert m["top1"] == 0.5
    assert m["top5"] == 0.75          # ranks 0, 4, 0 are < 5; rank 5 is not
    # per class recall: class0 1/1, class5 0/1, class1 0/1, class2 1/1 -> mean over 4 present classes
    assert m["mean_per_class_recall"] == 0.5
    assert m["n"] == 4


def test_ties_count_against_the_true_class() -> None:
    # Row 0: true class 1 tied with class 0 at the top -> not a top-1 hit, but top-2.
    # Row 1: all equal (a collapsed model) -> never in the top-k below the class count.
    scores = np.array([[1.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.5] * 6])
    labels = np.array([1, 3])
    assert true_class_rank(scores, labels).tolist() == [1, 5]
    assert topk_accuracy(scores, labels, 1) == 0.0
    assert topk_accuracy(scores, labels, 2) == 0.5
    assert topk_accuracy(scores, labels, 5) == 0.5
    assert topk_accuracy(scores, labels, 6) == 1.0
    assert mean_per_class_recall(scores, labels) == 0.0


def test_fewer_than_five_classes_has_no_top5() -> None:
    scores = np.array([[0.2, 0.8], [0.7, 0.3], [0.6, 0.4]])
    labels = np.array([1, 0, 1])
    m = classification_metrics(scores, labels)
    assert "top5" not in m
    assert m["top1"] == pytest.approx(2 / 3)
    assert m["mean_per_class_recall"] == pytest.approx((1.0 + 0.5) / 2)
    assert "top5" in classification_metrics(np.eye(5), np.arange(5))


def test_bad_labels_are_rejected() -> None:
    with pytest.raises(ValueError, match="labels must lie"):
        topk_accuracy(np.zeros((2, 3)), np.array([0, 3]), 1)
    with pytest.raises(ValueError, match="scores must be"):
        topk_accuracy(np.zeros((2, 3)), np.array([0, 1, 2]), 1)


def test_retrieval_with_several_captions_per_image() -> None:
    # 3 images; image 0 owns texts 0 and 1, image 1 owns text 2, image 2 owns texts 3, 4.
    owner = np.array([0, 0, 1, 2, 2])
    sim = np.array([
        # t0    t1    t2    t3    t4
        [0.10, 0.90, 0.95, 0.20, 0.00],  # img0: best own caption t1 ranks 2nd (t2 above) -> R@1 miss, R@5 hit
        [0.30, 0.20, 0.10, 0.40, 0.50],  # img1: own t2 is last (4 foreign captions above) -> R@1..4 miss
        [0.00, 0.10, 0.20, 0.30, 0.99],  # img2: own t4 first -> hit
    ])
    m = retrieval_metrics(sim, owner, ks=(1, 2, 5))
    assert m["i2t_r1"] == pytest.approx(1 / 3)
    assert m["i2t_r2"] == pytest.approx(2 / 3)
    assert m["i2t_r5"] == pytest.approx(3 / 3)
    # text->image columns: t0 true img0 (0.10) below img1 0.30 -> rank 1; t1 img0 0.90 top -> 0;
    # t2 true img1 0.10 below 0.95 and 0.20 -> rank 2; t3 img2 0.30 below img1 0.40 -> rank 1; t4 top -> 0
    assert m["t2i_r1"] == pytest.approx(2 / 5)
    assert m["t2i_r2"] == pytest.approx(4 / 5)
    assert m["t2i_r5"] == pytest.approx(1.0)


def test_retrieval_ties_and_one_caption_each_matches_topk() -> None:
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(40, 40))
    owner = np.arange(40)
    m = retrieval_metrics(sim, owner)
    # with one caption per image, i2t is classification of rows, t2i of columns
    assert m["i2t_r5"] == pytest.approx(top_k_accuracy_score(owner, sim, k=5, labels=owner))
    assert m["t2i_r10"] == pytest.approx(top_k_accuracy_score(owner, sim.T, k=10, labels=owner))
    tied = np.ones((2, 2))
    assert retrieval_metrics(tied, np.array([0, 1]), ks=(1, 2)) == {
        "i2t_r1": 0.0, "i2t_r2": 1.0, "t2i_r1": 0.0, "t2i_r2": 1.0}


def test_retrieval_rejects_image_without_caption() -> None:
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_metrics(np.zeros((3, 2)), np.array([0, 1]))
