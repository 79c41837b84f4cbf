"""A 3-class zero-shot case whose answer is forced: stub towers with hand-chosen features.

Two templates per class with embeddings of very different norms. Embedding-space
ensembling (normalise each, average, renormalise) must classify every image right, while
averaging the raw embeddings would get every image wrong, so the test tells the two apart.

    .venv/bin/python -m pytest -q tests/test_eval_zeroshot_synthetic.py
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from test_eval_stubs import ColourCLIP, colour_dataset
from pretrain.eval import build_zeroshot_classifier, zeroshot_eval, zeroshot_scores
from pretrain.eval.tasks import EvalContext, run_ablation

CLASSES = ["red", "green", "blue"]
TEMPLATES = ["a {} thing", "the {}"]
# (template 1, template 2) embedding per class; template norms differ by 10x.
EMB = {
    "red": ([10.0, 0.0, 0.0], [0.0, 1.0, 0.0]),
    "green": ([0.0, 0.0, 1.0], [0.0, 10.0, 0.0]),
    "blue": ([1.0, 0.0, 0.0], [0.0, 0.0, 10.0]),
}
# colours 0.2 = 51/255: proper ensembling -> red, green, blue; raw averaging -> green, blue, red
COLOURS = [(51, 255, 0), (0, 51, 255), (255, 0, 51)]
LABELS = [0, 1, 2]


def _model() -> ColourCLIP:
    table = {t.replace("{}", c): EMB[c][i] for c in CLASSES for i, t in enumerate(TEMPLATES)}
    for c, v in zip(CLASSES, np.eye(3)):
        table[c] = list(v)  # the bare name, and (as keyword) any other prompt naming the class
    return ColourCLIP(table, keywords=CLASSES)


def _hand_classifier() -> np.ndarray:
    rows = []
    for c in CLASSES:
        e = [np.asarray(v) / np.linalg.norm(v) for v in EMB[c]]
        m = np.mean(e, axis=0)
        rows.append(m / np.linalg.norm(m))
    return np.stack(rows)


def test_classifier_equals_hand_computed_ensemble() -> None:
    model = _model()
    W = build_zeroshot_classifier(model, model.tokenizer(), CLASSES, TEMPLATES, device="cpu")
    np.testing.assert_allclose(W.numpy(), _hand_classifier(), atol=1e-6)
    # e.g. red = normalize(mean((1,0,0), (0,1,0))) = (1/sqrt2, 1/sqrt2, 0)
    np.testing.assert_allclose(W[0].numpy(), [2 ** -0.5, 2 ** -0.5, 0.0], atol=1e-6)


def test_forced_zero_shot_answer_and_logits() -> None:
    model = _model()
    model.train()
    ds = colour_dataset(COLOURS, LABELS, CLASSES)
    res = zeroshot_eval(model, model.tokenizer(), ds, TEMPLATES, device="cpu", batch_size=2)
    assert res == {"top1": 1.0, "mean_per_class_recall": 1.0, "n": 3}  # 3 classes: no top5
    assert model.training and model.modes_seen and not any(model.modes_seen)  # eval inside, restored after

    x = np.asarray(COLOURS, dtype=np.float64) / 255.0
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    hand = 100.0 * x @ _hand_classifier().T
    W = build_zeroshot_classifier(model, model.tokenizer(), CLASSES, TEMPLATES)
    got = zeroshot_scores(torch.tensor(np.asarray(COLOURS) / 255.0), W)
    np.testing.assert_allclose(got.numpy(), hand, atol=1e-4)
    assert hand.argmax(1).tolist() == LABELS

    # The naive alternative (average raw embeddings) gets every image wrong: the test discriminates.
    raw = np.stack([np.mean(EMB[c], axis=0) for c in CLASSES])
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    assert (x @ raw.T).argmax(1).tolist() == [1, 2, 0]


def test_ablation_rows() -> None:
    model = _model()
    ds = colour_dataset(COLOURS, LABELS, CLASSES)
    ctx = EvalContext(model, model.tokenizer(), device="cpu", progress=False)
    res, md, _ = run_ablation(ctx, ds, TEMPLATES)
    v = res["variants"]
    # the other prompts embed each class on its own axis, so each image goes to its
    # dominant colour: all wrong; only the two-template ensemble gets them right
    assert v["class name only"]["top1"] == 0.0 and v["single template"]["top1"] == 0.0
    assert v["openai_imagenet ensemble (80)"]["top1"] == 0.0
    assert v["given templates"]["top1"] == 1.0 and v["given templates"]["n_templates"] == 2
    assert v["openai_imagenet ensemble (80)"]["n_templates"] == 80
    assert list(v) == ["class name only", "single template", "openai_imagenet ensemble (80)", "given templates"]
    assert "| class name only | 1 | 0.0000 |" in md


def test_unlabelled_dataset_is_rejected() -> None:
    model = _model()
    ds = colour_dataset(COLOURS, LABELS, CLASSES)
    ds.labels = None
    with pytest.raises(ValueError, match="no class labels"):
        zeroshot_eval(model, model.tokenizer(), ds, TEMPLATES)
