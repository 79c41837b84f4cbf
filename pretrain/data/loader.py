"""The training loader: a fixed number of (images, tokens) batches per rank and epoch.

Batch ``i`` of a rank belongs to stream ``i % W`` (W = max(1, num_workers)) and is the
``i // W``-th batch of that stream. A stream's content is a function of (sources, seed, epoch,
rank, stream) only, so:

- every rank yields exactly ``steps - start_step`` batches, whatever the shard sizes;
- ``start_step=k`` reproduces batches k..steps-1 of an uninterrupted run bit-for-bit (with the
  same num_workers): each worker fast-forwards its stream through the raw samples (shuffle
  buffer only, no decoding; local tars by their headers alone) and starts there;
- DataLoader worker w serves stream (k + w) % W, so its round-robin order is k, k+1, ...;
- splitting by rank and worker is explicit (pretrain/data/stream.py), not webdataset's
  node/worker splitters, so no rank or worker can end up without data.

A sample that fails to decode is counted and replaced by a random resident of the shuffle
buffer (which is not consumed), so the raw stream position, and with it resume, is unaffected;
a sample repeated within one batch (resampling) is replaced the same way, without counting.

    loader = make_train_loader([DataSource("shards/{00000..00009}.tar")], tokenizer=tok,
                               image_size=224, micro_batch=256, num_workers=4, seed=0,
                               epoch=3, rank=rank, world_size=world, steps=1000)
    for batch in loader: batch["images"], batch["tokens"], batch["skipped"]
"""
from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .sources import DataSource, expand_sources
from .stream import (ReadMode, ShuffleBuffer, SkipCounter, epoch_shards, read_samples,
                     resampled_shards, stream_rng, weighted_mix)
from .tar_reader import load_bytes
from .transforms import sample_rng, train_transform
from .workers import worker_context


_REPLACE_TRIES = 16


@dataclass(frozen=True)
class StreamConfig:
    shard_lists: tuple[tuple[str, ...], ...]
    weights: tuple[float, ...]
    tokenizer: Callable
    image_size: int
    micro_batch: int
    num_streams: int
    seed: int
    epoch: int
    rank: int
    world_size: int
    steps: int
    start_step: int
    resampled: bool
    shuffle_buffer: int
    crop_scale: tuple[float, float]
    context_length: int
    reduced_decode: bool
    return_keys: bool


def raw_stream(cfg: StreamConfig, stream: int, counter: SkipCounter, mode: ReadMode) -> ShuffleBuffer:
    """The shuffled raw samples of one (rank, stream): deterministic, endless."""
    per_source = []
    for i, shards in enumerate(cfg.shard_lists):
        if cfg.resampled:
            order = resampled_shards(list(shards), stream_rng(cfg.seed, cfg.epoch, cfg.rank, stream,
                                                              f"shards-{i}"))
        else:
            order = epoch_shards(list(shards), seed=cfg.seed + 7919 * i, epoch=cfg.epoch,
                                 rank=cfg.rank, world_size=cfg.world_size, stream=stream,
                                 num_streams=cfg.num_streams)
        per_source.append(read_samples(order, counter, len(set(shards)), mode))
    mixed = weighted_mix(per_source, list(cfg.weights),
                         stream_rng(cfg.seed, cfg.epoch, cfg.rank, stream, "mix"))
    return ShuffleBuffer(mixed, cfg.shuffle_buffer,
                         stream_rng(cfg.seed, cfg.epoch, cfg.rank, stream, "shuffle"))


class BatchStream(IterableDataset):
    """Yields this worker's share of the rank's batches, batched inside the worker."""

    def __init__(self, cfg: StreamConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def __iter__(self) -> Iterator[dict]:
        cfg = self.cfg
        info = get_worker_info()
        worker = info.id if info is not None else 0
        n_workers = info.num_workers if info is not None else 1
        if n_workers != cfg.num_streams:
            raise RuntimeError(f"loader built for {cfg.num_streams} streams runs with {n_workers} workers")
        first = cfg.start_step + worker
        if first >= cfg.steps:
            return
        stream = first % cfg.num_streams
        counter, mode = SkipCounter(), ReadMode(lazy=True)
        samples = raw_stream(cfg, stream, counter, mode)
        # Fast-forward: the batches before `first` in this stream, as raw samples only (local
        # tars: headers only; samples still buffered afterwards are read when used).
        for _ in range((first // cfg.num_streams) * cfg.micro_batch):
            next(samples)
        mode.lazy = False
        counter.since_batch = 0
        transform = train_transform(cfg.image_size, cfg.crop_scale, cfg.reduced_decode)
        for _ in range(first, cfg.steps, cfg.num_streams):
            raw = [next(samples) for _ in range(cfg.micro_batch)]
            yield self._make_batch(raw, samples, transform, counter)

    @staticmethod
    def _key(sample: dict) -> str:
        return f"{sample['__url__']}#{sample['__key__']}"

    def _decode(self, sample: dict, transform: Callable, counter: SkipCounter,
                out: torch.Tensor) -> tuple[str, str] | None:
        """Decode one sample's image into `out` (a row of the batch buffer); (caption, key),
        or None (counted) when it fails."""
        key = self._key(sample)
        try:
            transform(load_bytes(sample["image"]), sample_rng(self.cfg.seed, self.cfg.epoch, key), out)
            caption = load_bytes(sample["txt"]).decode("utf-8")
        except Exception as exn:  # noqa: BLE001 - a bad sample is skipped and counted
            counter.skip(f"{key}: {exn!r}", key)
            return None
        return caption, key

    def _make_batch(self, raw: list[dict], samples: ShuffleBuffer, transform: Callable,
                    counter: SkipCounter) -> dict:
        cfg = self.cfg
        # Every image is written straight into its row of one batch buffer (shared memory in a
        # worker): no per-sample tensor, no stacking copy, no copy on the way to the trainer.
        images = batch_buffer((cfg.micro_batch, 3, cfg.image_size, cfg.image_size))
        keys = [self._key(s) for s in raw]
        taken: set[str] = set()
        slots: list[tuple[str, str] | None] = []
        for i, (sample, key) in enumerate(zip(raw, keys)):
            # A repeat inside one batch (resampling can draw a shard twice) would be a false
            # negative for the contrastive loss: replace it like a bad sample (not counted).
            slots.append(None if key in taken else self._decode(sample, transform, counter, images[i]))
            taken.add(key)
        for i, slot in enumerate(slots):
            if slot is not None:
                continue
            # Replace from the buffer with an RNG keyed on the slot's sample: deterministic,
            # and the stream position does not move (so resume stays exact).
            rng = sample_rng(cfg.seed, cfg.epoch, f"{keys[i]}/replace/{i}")
            for _ in range(_REPLACE_TRIES):
                cand = samples.lend(rng)
                if cand is None or self._key(cand) in taken:
                    continue
                taken.add(self._key(cand))
                slots[i] = self._decode(cand, transform, counter, images[i])
                if slots[i] is not None:
                    break
        good = [i for i, s in enumerate(slots) if s is not None]
        if not good:
            raise RuntimeError(f"no decodable sample in a whole batch and its replacements "
                               f"(last error: {counter.last_error})")
        # Last resort (buffer full of bad data): repeat good samples of this batch.
        filler = itertools.cycle(good)
        for i, slot in enumerate(slots):
            if slot is None:
                j = next(filler)
                images[i].copy_(images[j])
                slots[i] = slots[j]
        captions = [s[0] for s in slots]  # type: ignore[index]
        tokens = cfg.tokenizer(captions, context_length=cfg.context_length)
        if tuple(tokens.shape) != (cfg.micro_batch, cfg.context_length):
            raise ValueError(f"tokenizer returned shape {tuple(tokens.shape)}, expected "
                             f"({cfg.micro_batch}, {cfg.context_length})")
        batch = {
            "images": images,
            "tokens": tokens.long(),
            "skipped": torch.tensor(counter.since_batch, dtype=torch.long),
        }
        if cfg.return_keys:
            batch["keys"] = [s[1] for s in slots]  # type: ignore[index]
        counter.since_batch = 0
        return batch


def batch_buffer(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor; inside a DataLoader worker its storage is allocated in shared
    memory, so handing the batch to the main process copies nothing (what torch's
    default_collate does for the batches it stacks)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
    return proto.new(storage).view(shape)


class TrainLoader:
    """Iterable over exactly ``steps - start_step`` batches; counts skipped samples."""

    def __init__(self, dataset: BatchStream, num_workers: int) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self._skipped = 0

    def __len__(self) -> int:
        return self.dataset.cfg.steps - self.dataset.cfg.start_step

    def skipped_total(self) -> int:
        """Bad samples skipped in the batches yielded so far by this loader."""
        return self._skipped

    def __iter__(self) -> Iterator[dict]:
        loader = DataLoader(
            self.dataset, batch_size=None, num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(), persistent_workers=False,
            multiprocessing_context=worker_context(self.num_workers))
        feeders_before = set(_queue_feeders())
        it = iter(loader)
        n = 0
        try:
            for batch in it:
                self._skipped += int(batch["skipped"])
                n += 1
                yield batch
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)  # absent with num_workers=0
            if shutdown is not None:
                shutdown()
            del it
            # The epoch's workers and their queues' feeder threads are gone before the next
            # epoch's loader starts: nothing accumulates over a run of many epochs.
            for thread in set(_queue_feeders()) - feeders_before:
                thread.join(timeout=10)
        if n != len(self):  # would mean a bug in the stream split, never silently accepted
            raise RuntimeError(f"loader produced {n} batches, expected {len(self)}")


def _queue_feeders() -> list[threading.Thread]:
    """The live feeder threads of multiprocessing queues (the DataLoader's index queues)."""
    return [t for t in threading.enumerate() if t.name == "QueueFeederThread"]


def make_train_loader(sources: Sequence[DataSource], *, tokenizer: Callable, image_size: int,
                      micro_batch: int, num_workers: int, seed: int, epoch: int, rank: int,
                      world_size: int, steps: int, start_step: int = 0, resampled: bool = True,
                      shuffle_buffer: int = 1000, crop_scale: tuple[float, float] = (0.9, 1.0),
                      context_length: int = 77, reduced_decode: bool = True,
                      return_keys: bool = False) -> TrainLoader:
    """Build the loader of one rank for one epoch (see the module docstring).

    ``reduced_decode`` decodes JPEGs at a reduced DCT scale when the crop allows it;
    ``return_keys`` adds ``batch["keys"]`` ("<shard url>#<sample key>" per row) for tests.
    """
    if not 0 <= start_step <= steps:
        raise ValueError(f"need 0 <= start_step <= steps, got start_step={start_step}, steps={steps}")
    if micro_batch < 1 or image_size < 1 or context_length < 1:
        raise ValueError("micro_batch, image_size and context_length must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    sources = [s if isinstance(s, DataSource) else DataSource(str(s)) for s in sources]
    shard_lists = expand_sources(sources)
    train_transform(image_size, crop_scale)  # validates crop_scale in the caller's process
    cfg = StreamConfig(
        shard_lists=tuple(tuple(s) for s in shard_lists), weights=tuple(s.weight for s in sources),
        tokenizer=tokenizer, image_size=int(image_size), micro_batch=int(micro_batch),
        num_streams=max(1, int(num_workers)), seed=int(seed), epoch=int(epoch), rank=int(rank),
        world_size=int(world_size), steps=int(steps), start_step=int(start_step),
        resampled=bool(resampled), shuffle_buffer=int(shuffle_buffer),
        crop_scale=(float(crop_scale[0]), float(crop_scale[1])), context_length=int(context_length),
        reduced_decode=bool(reduced_decode), return_keys=bool(return_keys))
    return TrainLoader(BatchStream(cfg), int(num_workers))
