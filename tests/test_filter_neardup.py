"""Near-duplicate search over 64-bit pHashes: equal to the brute-force greedy on clustered
data for every distance, first occurrence wins, chains, and a pool large enough that an
all-pairs comparison would not finish in the test's time."""
from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.filter.neardup import (
    _band_bounds, block_pairs, choose_bands, near_duplicate_mask, near_pairs, popcount64,
)


def brute_force(hashes: np.ndarray, d: int) -> np.ndarray:
    kept: list[int] = []
    removed = np.zeros(len(hashes), dtype=bool)
    for i, v in enumerate(hashes.tolist()):
        if any(bin(v ^ k).count("1") <= d for k in kept):
            removed[i] = True
        else:
            kept.append(v)
    return removed


def clustered(rng: np.random.Generator, n: int, centers: int, max_flips: int) -> np.ndarray:
    base = rng.integers(0, 2**64, size=centers, dtype=np.uint64, endpoint=False)
    out = base[rng.integers(0, centers, size=n)]
    for i in range(n):
        for b in rng.choice(64, int(rng.integers(0, max_flips + 1)), replace=False):
            out[i] ^= np.uint64(1) << np.uint64(b)
    return out


@pytest.mark.parametrize("d", [0, 1, 2, 3, 4, 6, 8])
def test_equals_brute_force(d):
    rng = np.random.default_rng(d)
    h = clustered(rng, 400, 30, 8)
    assert (near_duplicate_mask(h, d) == brute_force(h, d)).all()


def test_first_occurrence_wins_and_chains_keep_both_ends():
    a = 0
    b = 0b1111  # 4 from a
    c = 0b11111111  # 4 from b, 8 from a
    assert near_duplicate_mask(np.array([a, b, c, a], dtype=np.uint64), 4).tolist() == [False, True, False, True]
    assert near_duplicate_mask(np.array([b, a, c], dtype=np.uint64), 4).tolist() == [False, True, True]


def test_pairs_and_popcount():
    v = np.array([0, 1, 3, 2**63], dtype=np.uint64)
    assert popcount64(v).tolist() == [0, 1, 2, 1]
    assert near_pairs(v, 2).tolist() == [[0, 1], [0, 2], [1, 2], [0, 3], [1, 3]]
    assert 2 <= choose_bands(10**7, 4) <= 5


@pytest.mark.timeout(60)
def test_scales_to_a_large_pool():
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**64, size=200_000, dtype=np.uint64, endpoint=False)
    h[-1] = h[0] ^ np.uint64(0b101)  # one planted near-duplicate, at the very end
    removed = near_duplicate_mask(h, 4)
    assert removed.sum() == 1 and removed[-1]


@pytest.mark.parametrize("small", [256, 4], ids=["all-against-all", "banded"])
def test_block_pairs_equals_brute_force_within_each_block(small):
    """The distributed search's per-partition step: pairs that share the block's bits and
    lie within d, against all pairs compared by hand; groups are made large (few block
    values) so the banded search on the other bits runs too, the top and bottom blocks
    included (no shift past 64 bits)."""
    rng = np.random.default_rng(7)
    d = 4
    for shift, width in _band_bounds(d + 1):
        h = clustered(rng, 300, 12, 6)
        mask = np.uint64(((1 << width) - 1) << shift)
        h = (h & ~mask) | (rng.integers(0, 3, size=len(h)).astype(np.uint64) << np.uint64(shift))
        h = np.concatenate([h, h[:20]])  # repeats are one value
        got = {tuple(p) for p in block_pairs(h, shift, width, d, small=small).tolist()}
        v = sorted(set(h.tolist()))
        want = {(a, b) for i, a in enumerate(v) for b in v[i + 1:]
                if (a ^ b) & int(mask) == 0 and bin(a ^ b).count("1") <= d}
        assert got == want and len(want) > 50
        assert len(block_pairs(h, shift, width, d, small=small)) == len(want)  # each pair once
        # ... and every close pair of the whole set shares at least one block (pigeonhole)
    assert all(any((a ^ b) & (((1 << w) - 1) << s) == 0 for s, w in _band_bounds(d + 1))
               for a, b in [(0, 0b1111), (2**63, 2**63 | 0b1111 << 40)])
