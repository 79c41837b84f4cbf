"""DataLoader workers (training and evaluation) inherit no thread state from their process.

A trainer has other threads (MLflow logger, queue feeders). A worker forked from it gets a copy
of every lock those threads hold, held for ever. Here a background thread holds a lock while
the loaders start their workers; the workers take that lock: with a plain fork they would
wait for ever (the test fails on the acquire timeout), started by the fork server they run.
"""
from __future__ import annotations

import os
import threading

import pytest
import torch
from shard_factory import make_caption_shards

from pretrain.data import DataSource, make_train_loader
from pretrain.eval.features import extract_image_features

LOCK = threading.Lock()


def _take_lock_in_worker() -> None:
    if torch.utils.data.get_worker_info() is None:
        return  # the main process: the holder thread owns the lock there, by design
    if not LOCK.acquire(timeout=5):
        raise RuntimeError(f"worker {os.getpid()} inherited a lock held by another thread of its parent")
    LOCK.release()


class LockingTokenizer:
    def __call__(self, texts: list[str], context_length: int = 77) -> torch.Tensor:
        _take_lock_in_worker()
        return torch.zeros(len(texts), context_length, dtype=torch.long)


class LockingImages(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        _take_lock_in_worker()
        return torch.full((3, 4, 4), float(i)), i


class Flatten(torch.nn.Module):
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


@pytest.fixture
def lock_held_by_another_thread():
    taken, release = threading.Event(), threading.Event()

    def hold():
        with LOCK:
            taken.set()
            release.wait()

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    taken.wait()
    yield
    release.set()
    t.join()


@pytest.mark.timeout(120)
def test_train_loader_workers_start_clean(tmp_path, lock_held_by_another_thread):
    shards = make_caption_shards(tmp_path / "s", 2, 16, image_px=32)
    loader = make_train_loader([DataSource(shards.pattern)], tokenizer=LockingTokenizer(), image_size=32,
                               micro_batch=4, num_workers=2, seed=0, epoch=0, rank=0, world_size=1, steps=4)
    batches = list(loader)
    assert len(batches) == 4 and all(b["images"].shape == (4, 3, 32, 32) for b in batches)


@pytest.mark.timeout(120)
def test_eval_feature_workers_start_clean(lock_held_by_another_thread):
    fs = extract_image_features(Flatten(), LockingImages(), device="cpu", batch_size=2, num_workers=2,
                                progress=False)
    assert sorted(fs.indices.tolist()) == list(range(8))
    assert fs.features.shape == (8, 48)
