"""Few-shot linear probes (k labelled images per class, several seeds) beside zero-shot.

For each k in ``shots`` and each seed, k images per class are drawn from the training pool
(the part of the training set outside the validation split); C is searched on the
validation split exactly as in :mod:`pretrain.eval.linear_probe` (that split's labels only
choose C), then the probe is fit on the k-shot set alone and scored on the test set.
The paper's question "how many labelled examples is zero-shot worth" is answered by the
table and plot: the k where the few-shot curve crosses the zero-shot line.

    rows = few_shot(train_x, train_y, test_x, test_y, num_classes=10, shots=(1, 2, 4), seeds=3)
    print(few_shot_markdown(rows, zeroshot_top1=0.61)); few_shot_plot(rows, 0.61, "fewshot.png")
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pretrain.eval.linear_probe import class_scores, fit_logreg, search_c, stratified_split
from pretrain.eval.metrics import topk_accuracy

DEFAULT_SHOTS = (1, 2, 4, 8, 16)


def sample_k_per_class(labels: np.ndarray, pool: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k pool items per class present in the pool (all of them where a class has fewer)."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels[pool]):
        members = pool[labels[pool] == c]
        picked.append(rng.choice(members, size=min(k, len(members)), replace=False))
    return np.sort(np.concatenate(picked))


def few_shot(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
    num_classes: int, shots: Sequence[int] = DEFAULT_SHOTS, seeds: int = 5,
    val_fraction: float = 0.2, max_iter: int = 1000,
) -> list[dict]:
    """One row per k: mean and std of test top-1 over ``seeds`` draws, and the per-seed values."""
    if seeds < 1 or any(k < 1 for k in shots):
        raise ValueError("seeds and every k must be >= 1")
    pool, val = stratified_split(train_y, val_fraction, seed=0)
    rows = []
    for k in shots:
        accs, cs = [], []
        for seed in range(seeds):
            idx = sample_k_per_class(train_y, pool, k, seed=1000 * k + seed)
            if len(np.unique(train_y[idx])) < 2:
                raise ValueError("few-shot needs at least two classes in the training pool")
            found = search_c(train_x[idx], train_y[idx], train_x[val], train_y[val], max_iter)
            clf = fit_logreg(train_x[idx], train_y[idx], found.C, max_iter)
            accs.append(topk_accuracy(class_scores(clf, test_x, num_classes), test_y, 1))
            cs.append(found.C)
        rows.append({"k": int(k), "top1_mean": float(np.mean(accs)), "top1_std": float(np.std(accs)),
                     "top1_per_seed": [float(a) for a in accs], "C_per_seed": cs, "seeds": seeds})
    return rows


def zeroshot_worth(rows: list[dict], zeroshot_top1: float) -> str:
    """Plain-language reading: the smallest k whose mean probe accuracy reaches zero-shot."""
    for r in rows:
        if r["top1_mean"] >= zeroshot_top1:
            return (f"the {r['k']}-shot probe ({r['top1_mean']:.4f}) is the first to match or beat "
                    f"zero-shot ({zeroshot_top1:.4f})")
    return f"zero-shot ({zeroshot_top1:.4f}) beats every few-shot probe up to {rows[-1]['k']} shots"


def few_shot_markdown(rows: list[dict], zeroshot_top1: float | None) -> str:
    lines = ["| shots per class | top-1 mean | top-1 std | seeds |", "|---:|---:|---:|---:|"]
    if zeroshot_top1 is not None:
        lines.append(f"| 0 (zero-shot) | {zeroshot_top1:.4f} | - | - |")
    lines += [f"| {r['k']} | {r['top1_mean']:.4f} | {r['top1_std']:.4f} | {r['seeds']} |" for r in rows]
    if zeroshot_top1 is not None:
        lines += ["", zeroshot_worth(rows, zeroshot_top1) + "."]
    return "\n".join(lines) + "\n"


def few_shot_plot(rows: list[dict], zeroshot_top1: float | None, path: str | Path, title: str = "") -> Path:
    """PNG: mean top-1 (+- std) against shots per class (log2 axis), zero-shot as a line."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in rows]
    mean = np.array([r["top1_mean"] for r in rows])
    std = np.array([r["top1_std"] for r in rows])
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(ks, mean, "o-", label="linear probe (k-shot)")
    ax.fill_between(ks, mean - std, mean + std, alpha=0.25)
    if zeroshot_top1 is not None:
        ax.axhline(zeroshot_top1, color="C3", ls="--", label="zero-shot")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("labelled images per class")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(title or "few-shot linear probe vs zero-shot")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
