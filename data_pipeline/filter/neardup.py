"""Near-duplicate removal over 64-bit perceptual hashes, without comparing all pairs.

Multi-index hashing, vectorised: split the 64 bits into m bands. Two hashes within
Hamming distance d differ in at most floor(d / m) bits of some band (pigeonhole), so for
each band every hash is looked up (binary search in the sorted band values) under every
flip pattern of at most floor(d / m) bits; only those candidate pairs are compared in
full. m is chosen to minimise the estimated work for the pool size.

Greedy in order: a hash is removed when it lies within d of an earlier *kept* hash; the
first occurrence wins, and chains (A~B, B~C, A far from C) keep A and C.

    removed = near_duplicate_mask(np.array([...], dtype=np.uint64), max_distance=4)
"""
from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np

_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each uint64."""
    x = np.ascontiguousarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.int64)
    return _POPCOUNT8[x.view(np.uint8).reshape(-1, 8)].sum(axis=1, dtype=np.int64)


def _band_bounds(m: int, bits: int = 64) -> list[tuple[int, int]]:
    """(shift, width) of m bands tiling the low ``bits`` bits."""
    b = [round(i * bits / m) for i in range(m + 1)]
    return [(lo, hi - lo) for lo, hi in zip(b[:-1], b[1:])]


def _n_patterns(width: int, r: int) -> int:
    return sum(comb(width, k) for k in range(r + 1))


def choose_bands(n: int, max_distance: int, bits: int = 64) -> int:
    """m minimising lookups (n * patterns) + expected random candidate pairs."""
    best, best_cost = 2, float("inf")
    for m in range(2, min(max_distance + 1, 16) + 1):
        r = max_distance // m
        cost = 0.0
        for _, width in _band_bounds(m, bits):
            p = _n_patterns(width, r)
            cost += n * p + n * n * p / 2.0**width
        if cost < best_cost:
            best, best_cost = m, cost
    return best


def _flip_patterns(width: int, r: int) -> list[int]:
    pats = [0]
    for k in range(1, r + 1):
        pats.extend(sum(1 << b for b in bits) for bits in combinations(range(width), k))
    return pats


def near_pairs(values: np.ndarray, max_distance: int, chunk: int = 1 << 22, bits: int = 64) -> np.ndarray:
    """All pairs (i, j), i < j, with popcount(values[i] ^ values[j]) <= max_distance, as
    an int64 array [P, 2] sorted by (j, i). ``values`` should be distinct and below
    2**bits (the bands tile only those bits)."""
    n = len(values)
    if n < 2 or max_distance == 0:
        return np.zeros((0, 2), dtype=np.int64)
    m = choose_bands(n, max_distance, bits)
    r = max_distance // m
    found: list[np.ndarray] = []
    for shift, width in _band_bounds(m, bits):
        keys = ((values >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)
        perm = np.argsort(keys, kind="stable")
        sk = keys[perm]
        direct = width <= 24  # a dense bucket table (<= 16M entries) beats binary search
        if direct:
            bucket_count = np.bincount(keys, minlength=1 << width)
            bucket_start = np.cumsum(bucket_count) - bucket_count
        for pat in _flip_patterns(width, r):
            q = keys ^ pat
            if direct:
                lo, cnt = bucket_start[q], bucket_count[q]
            else:
                lo = np.searchsorted(sk, q, "left")
                cnt = np.searchsorted(sk, q, "right") - lo
            # Expand (query i) x (matching sorted positions) in chunks of pairs.
            starts = np.cumsum(cnt) - cnt
            total = int(cnt.sum())
            for c0 in range(0, total, chunk):
                c1 = min(total, c0 + chunk)
                flat = np.arange(c0, c1, dtype=np.int64)
                qi = np.searchsorted(starts, flat, "right") - 1
                j = perm[lo[qi] + (flat - starts[qi])]
                sel = j < qi  # each unordered pair once per band hit, earlier index first
                qi, j = qi[sel], j[sel]
                close = popcount64(values[qi] ^ values[j]) <= max_distance
                found.append(np.stack([j[close], qi[close]], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.unique(np.concatenate(found), axis=0)
    order = np.lexsort((pairs[:, 0], pairs[:, 1]))
    return pairs[order]


def block_pairs(values: np.ndarray, shift: int, width: int, max_distance: int, small: int = 256) -> np.ndarray:
    """Every pair of distinct values that agree exactly on bits [shift, shift + width) and
    lie within max_distance, as a uint64 array [P, 2] of (value, value), each pair once.

    The second level of a two-level multi-index search: values are grouped by those bits
    (the pigeonhole block a distributed caller shuffled them by), and each group is searched
    on its other 64 - width bits only, where its values differ. Searching a group on all 64
    bits would put its shared block into one band bucket and compare every pair in it; one
    search over all groups together would not use the grouping at all, and its candidate
    pairs would grow with the square of the whole partition. Groups of at most ``small``
    values are compared all against all (cheaper than building bands)."""
    v = np.unique(np.asarray(values, dtype=np.uint64))
    if len(v) < 2:
        return np.zeros((0, 2), dtype=np.uint64)
    key = (v >> np.uint64(shift)) & np.uint64((1 << width) - 1)
    top = shift + width
    high = (v >> np.uint64(top)) << np.uint64(shift) if top < 64 else np.zeros_like(v)
    rest = high | (v & np.uint64((1 << shift) - 1))  # the block's bits taken out: same distances
    order = np.argsort(key, kind="stable")
    cuts = np.flatnonzero(np.diff(key[order])) + 1
    out: list[np.ndarray] = []
    for idx in np.split(order, cuts):
        n = len(idx)
        if n < 2:
            continue
        if n <= small:
            i, j = np.triu_indices(n, 1)
            keep = popcount64(rest[idx[i]] ^ rest[idx[j]]) <= max_distance
            ij = np.stack([i[keep], j[keep]], axis=1)
        else:
            ij = near_pairs(rest[idx], max_distance, bits=64 - width)
        if len(ij):
            out.append(np.stack([v[idx[ij[:, 0]]], v[idx[ij[:, 1]]]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.uint64)


def near_duplicate_mask(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Bool mask (same order as ``hashes``): True where the hash is within max_distance of
    an earlier kept one. Exact repeats are always removed (the earlier copy shares their
    fate), so the pair search runs over distinct values only."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    removed = np.zeros(len(hashes), dtype=bool)
    if len(hashes) == 0:
        return removed
    _, first = np.unique(hashes, return_index=True)
    removed[:] = True
    removed[first] = False
    if max_distance == 0:
        return removed
    order = np.sort(first)  # distinct values, in order of first appearance
    pairs = near_pairs(hashes[order], max_distance)
    if len(pairs) == 0:
        return removed
    gone = np.zeros(len(order), dtype=bool)
    # pairs are sorted by the later index: every earlier index is decided before it is used.
    later = pairs[:, 1]
    bounds = np.flatnonzero(np.diff(later)) + 1
    for grp in np.split(pairs, bounds):
        gone[grp[0, 1]] = bool((~gone[grp[:, 0]]).any())
    removed[order[gone]] = True
    return removed
