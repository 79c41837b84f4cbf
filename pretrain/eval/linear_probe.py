"""Linear probes on frozen image features (the CLIP paper's protocol, arXiv 2103.00020 appendix A.3).

scikit-learn L-BFGS logistic regression (max_iter 1000). The inverse regularisation C is
searched on a validation split: first the decade grid 1e-6 .. 1e6, then a binary search
that halves the step around the best value down to 1/8 decade (the paper's parametric
search); ties go to the smaller C (stronger regularisation). The chosen C is refit on
train + val and scored on the test set.

    from pretrain.eval.linear_probe import linear_probe
    res = linear_probe(train_x, train_y, test_x, test_y, num_classes=10)   # {"top1", "C", ...}
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from pretrain.eval.metrics import classification_metrics

LOG10_C_RANGE = (-6.0, 6.0)
FINEST_STEP = 1.0 / 8.0
# Below this many feature values a fit takes milliseconds, and multi-threaded BLAS only adds
# synchronisation (measured 20-50x slower on a loaded 2-core box); big probes keep all threads.
SINGLE_THREAD_BELOW = 4_000_000


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): per class, a ``val_fraction`` share (at least one item when the
    class has two or more) goes to validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = max(1, int(round(len(idx) * val_fraction))) if len(idx) >= 2 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def fit_logreg(x: np.ndarray, y: np.ndarray, C: float, max_iter: int = 1000) -> LogisticRegression:
    clf = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter)
    threads = 1 if x.size < SINGLE_THREAD_BELOW else None
    with warnings.catch_warnings(), threadpool_limits(limits=threads):
        # At extreme C L-BFGS may stop at max_iter; the search still compares the results.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return clf


def class_scores(clf: LogisticRegression, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Decision scores [N, num_classes]; classes absent from training score -inf."""
    d = clf.decision_function(x)
    if d.ndim == 1:  # binary problem: sklearn returns the score of classes_[1] only
        d = np.stack([-d, d], axis=1) / 2.0
    out = np.full((len(x), num_classes), -np.inf)
    out[:, clf.classes_.astype(np.int64)] = d
    return out


def _accuracy(clf: LogisticRegression, x: np.ndarray, y: np.ndarray) -> float:
    return float((clf.predict(x) == y).mean())


@dataclass
class SearchResult:
    C: float
    val_accuracy: float
    tried: dict[float, float] = field(default_factory=dict)  # log10(C) -> val accuracy


def search_c(xtr: np.ndarray, ytr: np.ndarray, xval: np.ndarray, yval: np.ndarray,
             max_iter: int = 1000) -> SearchResult:
    """Decade grid, then halve the step around the best log10(C) down to 1/8 decade."""
    lo, hi = LOG10_C_RANGE
    tried: dict[float, float] = {}

    def score(e: float) -> float:
        e = round(e, 6)
        if e not in tried:
            tried[e] = _accuracy(fit_logreg(xtr, ytr, 10.0 ** e, max_iter), xval, yval)
        return tried[e]

    def better(a: float, b: float) -> bool:  # a beats b: higher accuracy, then smaller C
        return (score(a), -a) > (score(b), -b)

    best = lo
    for e in np.arange(lo, hi + 0.5):
        if better(float(e), best):
            best = float(e)
    step = 1.0
    while step > FINEST_STEP:
        step /= 2.0
        for e in (best - step, best + step):
            if lo <= e <= hi and better(e, best):
                best = e
    return SearchResult(C=10.0 ** best, val_accuracy=tried[round(best, 6)], tried=tried)


def linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
    num_classes: int, val_fraction: float = 0.2, seed: int = 0, max_iter: int = 1000,
) -> dict:
    """C searched on a stratified validation split of the training set, refit on all of it."""
    tr, va = stratified_split(train_y, val_fraction, seed)
    if len(va) == 0:
        raise ValueError("no class has two training examples: cannot carve a validation split")
    found = search_c(train_x[tr], train_y[tr], train_x[va], train_y[va], max_iter)
    clf = fit_logreg(train_x, train_y, found.C, max_iter)
    out = classification_metrics(class_scores(clf, test_x, num_classes), test_y)
    out.update(C=found.C, val_top1=found.val_accuracy, n_train=int(len(tr)), n_val=int(len(va)),
               n_c_tried=len(found.tried))
    return out
