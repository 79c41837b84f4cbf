"""pretrain.train.prefetch.DevicePrefetcher: on CPU a pass-through that yields the loader's
batches unchanged and closes it; on CUDA (when present) the same values, on the device.

Run: `.venv/bin/python -m pytest -q tests/test_prefetch.py`.
"""

from __future__ import annotations

import pytest
import torch

from pretrain.train.prefetch import DevicePrefetcher


def _batches(n: int):
    gen = torch.Generator().manual_seed(0)
    return [{"images": torch.randn(2, 3, 4, 4, generator=gen), "tokens": torch.randint(0, 9, (2, 5), generator=gen),
             "skipped": torch.tensor(i)} for i in range(n)]


class _Source:
    def __init__(self, items):
        self.it, self.closed = iter(items), False

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.it)

    def close(self):
        self.closed = True


def test_cpu_is_a_pass_through_that_closes_the_loader():
    items = _batches(3)
    src = _Source(items)
    pre = DevicePrefetcher(src, torch.device("cpu"), torch.bfloat16)
    got = list(pre)
    assert len(got) == 3 and all(a is b for a, b in zip(got, items))  # the very same objects
    pre.close()
    assert src.closed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_same_batches_on_the_device():
    items = _batches(3)
    dev = torch.device("cuda")
    got = list(DevicePrefetcher(iter(items), dev, torch.bfloat16))
    assert len(got) == 3
    for a, b in zip(items, got):
        assert b["images"].is_cuda and b["images"].dtype == torch.bfloat16
        assert torch.equal(b["images"].cpu(), a["images"].to(torch.bfloat16))
        assert torch.equal(b["tokens"].cpu(), a["tokens"]) and not b["skipped"].is_cuda and int(b["skipped"]) == int(a["skipped"])
