"""The raw-sample stream of one loader stream (one rank x one worker), before any decoding.

Stages, each a generator whose randomness comes only from explicit seeds:

1. shard order per source: resampled (endless draws with replacement, seeded by
   (seed, epoch, rank, stream)), or epoch-wise (the list shuffled with (seed, epoch) alike on
   every rank, split by rank then by stream, cycled so it never runs dry);
2. ``read_samples``: tar members grouped by key (webdataset's tar iterator), keeping only
   the image and caption bytes; unreadable shards and incomplete samples are skipped and
   counted in a ``SkipCounter``;
3. ``weighted_mix``: per-sample choice of the source by weight;
4. ``ShuffleBuffer``: a seeded reservoir shuffle that can also lend a random resident
   (used to replace a sample that fails to decode without moving the stream position).

Because nothing here decodes, a resumed loader can fast-forward through this stream cheaply.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from webdataset.tariterators import group_by_keys, tar_file_iterator

from .sources import open_shard

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
RawSample = dict  # {"__key__", "__url__", "image": bytes, "txt": bytes}


@dataclass
class SkipCounter:
    """Bad samples / shard errors seen by one stream; ``since_batch`` resets at every batch."""

    total: int = 0
    since_batch: int = 0
    max_warnings: int = 20
    last_error: str = ""
    warned: set = field(default_factory=set)

    def skip(self, what: str, where: str = "", n: int = 1) -> None:
        self.total += n
        self.since_batch += n
        self.last_error = what
        # Warn once per place (a resampled bad shard is met again and again), and for the
        # first few places only: a bad source must not flood the log.
        if where not in self.warned and len(self.warned) < self.max_warnings:
            self.warned.add(where)
            more = " (further skips are counted silently)" if len(self.warned) == self.max_warnings else ""
            log.warning("skipping bad data: %s%s", what, more)


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


def read_shard(url: str, counter: SkipCounter) -> Iterator[RawSample]:
    """Samples of one tar with their image and caption bytes; errors are counted, not raised.

    A truncated tar yields the samples before the damage and counts one skip for the rest.
    """
    stream = None

    def stop(exn: Exception) -> bool:
        # A member that cannot be read means the tar stream is broken from there on.
        counter.skip(f"{url}: {exn}", url)
        return False

    def go_on(exn: Exception) -> bool:
        counter.skip(f"{url}: {exn}", url)
        return True

    try:
        stream = open_shard(url)
        members = tar_file_iterator(stream, handler=stop)
        members = ({**m, "__url__": url} for m in members)
        for sample in group_by_keys(members, handler=go_on):
            image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
            txt = sample.get("txt")
            if image is None or txt is None:
                missing = "image" if image is None else "txt"
                counter.skip(f"{url}: sample {sample.get('__key__')} has no {missing}",
                             f"{url}#{sample.get('__key__')}")
                continue
            yield {"__key__": sample["__key__"], "__url__": url, "image": image, "txt": txt}
    except Exception as exn:  # noqa: BLE001 - any read error of a shard is skipped and counted
        counter.skip(f"{url}: {exn!r}", url)
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001
                pass


def read_samples(shard_iter: Iterator[str], counter: SkipCounter, n_unique: int) -> Iterator[RawSample]:
    """Samples from a sequence of shards. Raises if many shards in a row give nothing, since
    an endless shard sequence over unreadable data would otherwise hang the run."""
    limit = max(16, 2 * n_unique)
    empty_in_row = 0
    for url in shard_iter:
        got = False
        for sample in read_shard(url, counter):
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
