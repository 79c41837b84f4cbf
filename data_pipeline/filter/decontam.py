"""Decontamination: drop training samples whose image matches one of an evaluation set's
(pHash within ``filter.eval_overlap.max_distance``), counted as filter/eval_overlap. Runs
first in pass 2, over the pass-1 survivors, in either engine.

    eval_h = eval_hashes("eval_images/")                # every image file under the folder
    drop = eval_overlap_mask(train_hashes, eval_h, 4)   # bool per training hash
"""
from __future__ import annotations

import fsspec
import imagehash
import numpy as np
from PIL import Image

from data_pipeline.filter.neardup import near_pairs

EVAL_OVERLAP = "filter/eval_overlap"
_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def eval_hashes(folder: str) -> np.ndarray:
    """pHashes (uint64) of every image file under ``folder`` (local path or fsspec URL);
    a file that does not decode is an error, so a broken eval set is not silently half used."""
    fs, root = fsspec.core.url_to_fs(folder)
    if not fs.isdir(root):
        raise FileNotFoundError(f"filter.eval_overlap.eval_images: no folder {folder}")
    out = []
    for p in sorted(fs.find(root)):
        if p.lower().endswith(_EXTS):
            with fs.open(p, "rb") as f, Image.open(f) as img:
                out.append(int(str(imagehash.phash(img.convert("RGB"))), 16))
    if not out:
        raise ValueError(f"filter.eval_overlap.eval_images: no image files under {folder}")
    return np.unique(np.array(out, dtype=np.uint64))


def eval_overlap_mask(train: np.ndarray, evals: np.ndarray, max_distance: int) -> np.ndarray:
    """True where a training hash lies within max_distance of some eval hash."""
    train = np.asarray(train, dtype=np.uint64)
    hit = np.isin(train, evals)
    if max_distance > 0 and len(train) and len(evals):
        pairs = near_pairs(np.concatenate([evals, train]), max_distance)
        e = len(evals)
        cross = pairs[(pairs[:, 0] < e) & (pairs[:, 1] >= e)]
        hit[cross[:, 1] - e] = True
    return hit
