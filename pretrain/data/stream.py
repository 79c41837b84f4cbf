"""The raw-sample stream of one loader stream (one rank x one worker), before any decoding.

Stages, each a generator whose randomness comes only from explicit seeds:

1. shard order per source: resampled (endless draws with replacement, seeded by
   (seed, epoch, rank, stream)), or epoch-wise (the list shuffled with (seed, epoch) alike on
   every rank, split by rank then by stream, cycled so it never runs dry);
2. ``read_samples``: the samples of those shards (``tar_reader``), with a guard against an
   endless sequence of unreadable shards;
3. ``weighted_mix``: per-sample choice of the source by weight;
4. ``ShuffleBuffer``: a seeded reservoir shuffle that can also lend a random resident
   (used to replace a sample that fails to decode without moving the stream position).

Because nothing here decodes (and local tars are read lazily in ``ReadMode(lazy=True)``), a
resumed loader can fast-forward through this stream cheaply.
"""
from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterator

from .tar_reader import RawSample, ReadMode, SkipCounter, read_shard

__all__ = ["RawSample", "ReadMode", "ShuffleBuffer", "SkipCounter", "epoch_shards", "read_samples",
           "resampled_shards", "stream_rng", "weighted_mix"]


def stream_rng(seed: int, epoch: int, rank: int, stream: int, tag: str) -> random.Random:
    return random.Random(f"{int(seed)}/{int(epoch)}/{int(rank)}/{int(stream)}/{tag}")


def resampled_shards(shards: list[str], rng: random.Random) -> Iterator[str]:
    """Endless shard draws with replacement: every rank/stream has data whatever the count."""
    while True:
        yield shards[rng.randrange(len(shards))]


def epoch_shards(shards: list[str], *, seed: int, epoch: int, rank: int, world_size: int,
                 stream: int, num_streams: int) -> Iterator[str]:
    """Epoch-wise order: the list shuffled with (seed, epoch) (same on every rank), split by
    rank then by stream. A rank or stream left without shards takes one by wrapping around,
    and its list is cycled (reshuffled per pass), so a fixed step count never runs dry."""
    order = list(shards)
    random.Random(f"{int(seed)}+{int(epoch)}").shuffle(order)
    node = order[rank::world_size] or [order[rank % len(order)]]
    mine = node[stream::num_streams] or [node[stream % len(node)]]
    rng = stream_rng(seed, epoch, rank, stream, "epoch-pass")
    for n_pass in itertools.count():
        if n_pass > 0:
            rng.shuffle(mine)
        yield from mine


def read_samples(shard_iter: Iterator[str], counter: SkipCounter, n_unique: int,
                 mode: ReadMode) -> Iterator[RawSample]:
    """Samples from a sequence of shards. Raises if many shards in a row give nothing, since
    an endless shard sequence over unreadable data would otherwise hang the run."""
    limit = max(16, 2 * n_unique)
    empty_in_row = 0
    for url in shard_iter:
        got = False
        for sample in read_shard(url, counter, mode):
            got = True
            yield sample
        empty_in_row = 0 if got else empty_in_row + 1
        if empty_in_row >= limit:
            raise RuntimeError(
                f"{empty_in_row} shards in a row gave no readable sample (last: {url}; "
                f"last error: {counter.last_error or 'none, the shards are empty'})")


def weighted_mix(streams: list[Iterator[RawSample]], weights: list[float],
                 rng: random.Random) -> Iterator[RawSample]:
    """Interleave endless streams, choosing the source of each sample with probability
    proportional to its weight."""
    if len(streams) == 1:
        yield from streams[0]
        return
    cum = list(itertools.accumulate(weights))
    total = cum[-1]
    while True:
        yield next(streams[bisect.bisect_right(cum, rng.random() * total)])


class ShuffleBuffer:
    """Reservoir shuffle: keep ``size`` samples, emit a random one for each new arrival."""

    def __init__(self, source: Iterator[RawSample], size: int, rng: random.Random) -> None:
        self.source = source
        self.size = max(1, int(size))
        self.rng = rng
        self.buf: list[RawSample] = []

    def __iter__(self) -> Iterator[RawSample]:
        return self

    def __next__(self) -> RawSample:
        while len(self.buf) < self.size:
            # The source is endless (resampled or cycled), so filling always ends.
            self.buf.append(next(self.source))
        i = self.rng.randrange(len(self.buf))
        out = self.buf[i]
        self.buf[i] = next(self.source)
        return out

    def lend(self, rng: random.Random) -> RawSample | None:
        """A random resident, left in place (it is still emitted later in its own turn)."""
        return self.buf[rng.randrange(len(self.buf))] if self.buf else None
