"""MetaCLIP-style balancing: match captions against an entry list, then cap each entry.

Pass 1 (per shard) runs ``EntryMatcher.match`` on every caption; pass 2 (global) runs
``balance_keep`` over the whole pool. See ``BalanceConfig`` for the sampling rule.

    m = EntryMatcher(["red dress", "dog"])
    m.match("A Red Dress for my dog")          # ['dog', 'red dress'] (sorted, unique)
"""
from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence

import ahocorasick
import fsspec
import numpy as np

from data_pipeline.filter.config import BalanceConfig

BALANCE = "filter/balance"
BALANCE_NO_MATCH = "filter/balance_no_match"


def load_entries(cfg: BalanceConfig) -> list[str]:
    """The entry list (config list + file), lower-cased, stripped, unique, in first-seen order."""
    raw = list(cfg.entries)
    if cfg.entries_file:
        with fsspec.open(cfg.entries_file, "rt", encoding="utf-8") as f:
            raw.extend(f.read().splitlines())
    seen: dict[str, None] = {}
    for e in raw:
        e = " ".join(e.split()).lower()
        if e:
            seen.setdefault(e, None)
    return list(seen)


class EntryMatcher:
    """Aho-Corasick over lower-cased entries; a hit counts only on word boundaries
    (the characters before and after it are not letters or digits), so "cat" does not match
    "concatenate" but "t-shirt" matches "a blue t-shirt"."""

    def __init__(self, entries: Sequence[str]):
        self.entries = list(entries)
        self._auto = ahocorasick.Automaton()
        for e in self.entries:
            self._auto.add_word(e, e)
        if self.entries:
            self._auto.make_automaton()

    def match(self, caption: str) -> list[str]:
        if not self.entries:
            return []
        # Collapse whitespace so "red  dress" matches the entry "red dress".
        text = " ".join(caption.lower().split())
        hits: set[str] = set()
        for end, entry in self._auto.iter(text):
            start = end - len(entry) + 1
            before = text[start - 1] if start > 0 else " "
            after = text[end + 1] if end + 1 < len(text) else " "
            if not before.isalnum() and not after.isalnum():
                hits.add(entry)
        return sorted(hits)


def draw(seed: int, sha256: str, url: str, entry: str) -> float:
    """The deterministic uniform draw in [0, 1) for (sample, entry)."""
    h = hashlib.blake2b(f"{seed}|{sha256}|{url}|{entry}".encode(), digest_size=16).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def balance_keep(
    matches: Sequence[Sequence[str]], sha256: Sequence[str], urls: Sequence[str | None], cfg: BalanceConfig
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Decide over the whole pool: (keep mask, no-match mask, count per entry).

    An entry with count <= t keeps all of its samples (probability 1), so an entry list of
    rare concepts keeps the tail whole, as in MetaCLIP.
    """
    counts: Counter[str] = Counter()
    for m in matches:
        counts.update(set(m))
    t = cfg.max_per_entry
    keep = np.zeros(len(matches), dtype=bool)
    no_match = np.zeros(len(matches), dtype=bool)
    for i, m in enumerate(matches):
        if len(m) == 0:
            no_match[i] = True
            keep[i] = cfg.keep_unmatched
            continue
        for e in m:
            c = counts[e]
            if c <= t or draw(cfg.seed, sha256[i], urls[i] or "", e) < t / c:
                keep[i] = True
                break
    return keep, no_match, dict(counts)
