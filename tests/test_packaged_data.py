"""The packaged real datasets load with the right shapes, labels and class names."""
import numpy as np
import pytest

from pretrain import packaged_data as pd_


@pytest.mark.parametrize("name", pd_.packaged_names())
def test_splits_are_disjoint_and_cover_all_classes(name):
    if name == "fashion-mnist" and not pd_.fashion_mnist_available():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    train, test = pd_.load_packaged(name, "train"), pd_.load_packaged(name, "test")
    for ds in (train, test):
        assert ds.images.dtype == np.uint8 and ds.images.ndim == 3
        assert len(ds.images) == len(ds.labels)
        assert set(np.unique(ds.labels)) == set(range(len(ds.classnames)))
    # no test image appears in train (byte-identical duplicates would leak labels)
    train_hashes = {img.tobytes() for img in train.images[:2000]}
    assert sum(img.tobytes() in train_hashes for img in test.images[:500]) <= 5


def test_fashion_mnist_sizes():
    if not pd_.fashion_mnist_available():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    assert len(pd_.load_fashion_mnist("train")) == 60000
    test = pd_.load_fashion_mnist("test")
    assert test.images.shape == (10000, 28, 28)
    assert np.bincount(test.labels).tolist() == [1000] * 10


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown packaged dataset"):
        pd_.load_packaged("imagenet")
