"""Classification and retrieval metrics on score matrices (numpy or torch in, floats out).

Tie rule (all metrics here): a tie counts against the right answer. The true class is in the
top k only when fewer than k *other* classes score >= its score; likewise for retrieval.
So a collapsed model that gives every class the same score gets 0 accuracy, never a lucky
"first index wins" score. Without ties the metrics equal scikit-learn's
``top_k_accuracy_score`` and ``recall_score(average="macro")`` of the argmax.

    from pretrain.eval.metrics import classification_metrics, retrieval_metrics
    classification_metrics(logits, labels)           # {"top1", "top5", "mean_per_class_recall", "n"}
    retrieval_metrics(sim, text_to_image)            # sim [n_images, n_texts]
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _np(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def _scores(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Float scores without up-casting (a 50k x 1000 or 5k x 25k matrix stays float32);
    never down-cast either, which could create ties that the caller's numbers do not have."""
    a = _np(x)
    return a if np.issubdtype(a.dtype, np.floating) else a.astype(np.float64)


def true_class_rank(scores: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per row: how many *other* classes score >= the true class (0 = a clear top-1 hit)."""
    s = _scores(scores)
    y = _np(labels).astype(np.int64)
    if s.ndim != 2 or y.shape != (s.shape[0],):
        raise ValueError(f"scores must be [N, C] and labels [N]; got {s.shape} and {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= s.shape[1]):
        raise ValueError(f"labels must lie in [0, {s.shape[1]}); got range [{y.min()}, {y.max()}]")
    true = s[np.arange(len(y)), y][:, None]
    return (s >= true).sum(axis=1) - 1  # minus the true class itself


def topk_accuracy(scores: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, k: int) -> float:
    """Fraction of rows whose true class is among the top k (ties count as misses)."""
    rank = true_class_rank(scores, labels)
    return float((rank < k).mean()) if rank.size else float("nan")


def mean_per_class_recall(
    scores: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, num_classes: int | None = None
) -> float:
    """Top-1 recall averaged over the classes present in ``labels`` (balanced accuracy)."""
    hit = true_class_rank(scores, labels) == 0
    y = _np(labels).astype(np.int64)
    present = np.unique(y)
    if num_classes is not None and present.size and present.max() >= num_classes:
        raise ValueError("label outside num_classes")
    return float(np.mean([hit[y == c].mean() for c in present])) if present.size else float("nan")


def classification_metrics(scores: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> dict:
    """top1, top5 (only with >= 5 classes), mean_per_class_recall and n."""
    s = _np(scores)
    out: dict = {"top1": topk_accuracy(s, labels, 1)}
    if s.shape[1] >= 5:
        out["top5"] = topk_accuracy(s, labels, 5)
    out["mean_per_class_recall"] = mean_per_class_recall(s, labels)
    out["n"] = int(s.shape[0])
    return out


def retrieval_metrics(
    similarity: np.ndarray | torch.Tensor,
    text_to_image: Sequence[int] | np.ndarray | torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict:
    """Recall@k both ways for ``similarity`` [n_images, n_texts].

    ``text_to_image[t]`` is the image that text t describes; an image may own several texts.
    image->text: a hit when the image's best-scoring own caption has fewer than k foreign
    captions scoring >= it (i.e. any own caption is in the top k). text->image: a hit when
    fewer than k other images score >= the true image.
    """
    sim = _scores(similarity)
    owner = _np(text_to_image).astype(np.int64)
    n_img, n_txt = sim.shape
    if owner.shape != (n_txt,):
        raise ValueError(f"text_to_image must have one entry per text ({n_txt}); got {owner.shape}")
    if n_txt and (owner.min() < 0 or owner.max() >= n_img):
        raise ValueError("text_to_image holds an image index out of range")
    if np.bincount(owner, minlength=n_img).min(initial=1) == 0:
        raise ValueError("every image needs at least one caption for image->text recall")
    i2t_rank = np.empty(n_img, dtype=np.int64)
    for lo in range(0, n_img, 1024):  # row blocks bound the temporaries for 5k x 25k matrices
        rows = sim[lo:lo + 1024]
        own = owner[None, :] == np.arange(lo, lo + len(rows))[:, None]
        best_own = np.where(own, rows, -np.inf).max(axis=1, keepdims=True)
        i2t_rank[lo:lo + len(rows)] = ((rows >= best_own) & ~own).sum(axis=1)
    t2i_rank = true_class_rank(sim.T, owner)
    out: dict = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t_rank < k).mean())
    for k in ks:
        out[f"t2i_r{k}"] = float((t2i_rank < k).mean())
    return out
