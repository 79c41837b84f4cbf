"""Reading the samples of one webdataset shard, counting (never raising) what is bad.

``read_shard(url, counter, mode)`` yields ``{"__key__", "__url__", "image", "txt"}`` for every
sample that has an image and a caption; other members (json, cls, ...) are dropped early to
keep the shuffle buffer small. Errors are counted in a ``SkipCounter`` (``warn_and_continue``
style): an unreadable shard, a truncated tar (the samples before the damage are kept), a
sample without image or caption.

Local tars are read with seeks: with ``ReadMode(lazy=True)`` a member's bytes are not read
but referenced (``MemberRef``), so a resumed loader fast-forwards past millions of samples
reading only tar headers; ``load_bytes`` reads a reference when the sample is finally used.
Truncation is judged from the headers (member end beyond the file size), so lazy and eager
reading see exactly the same samples. Other URLs (``pipe:``, fsspec) are streamed with
webdataset's tar iterator and always read eagerly.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from webdataset.tariterators import group_by_keys, tar_file_iterator

from pretrain.shards.tario import Member, scan_members

from .sources import open_shard

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
RawSample = dict  # {"__key__", "__url__", "image": bytes | MemberRef, "txt": bytes | MemberRef}


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


@dataclass
class ReadMode:
    """Shared switch: while ``lazy`` is set, local members are referenced, not read."""

    lazy: bool = False


# A lazily read member: the byte range of one tar member in a local file.
MemberRef = Member


def load_bytes(value: bytes | MemberRef) -> bytes:
    return value.read() if isinstance(value, MemberRef) else value


def local_path(url: str) -> str | None:
    """The filesystem path of a local shard, None for pipes and remote URLs."""
    if url.startswith("file://"):
        return url[len("file://"):]
    if url.startswith("pipe:") or "://" in url:
        return None
    return url


def _local_members(path: str, url: str, mode: ReadMode) -> Iterator[dict]:
    """Members of a local tar through the one tar index reader (pretrain.shards.tario);
    bytes only when not lazy. Damage raises after the complete members before it."""
    with open(path, "rb") as f:
        for name, offset, size in scan_members(f, url):
            if mode.lazy:
                data: bytes | MemberRef = MemberRef(path, offset, size)
            else:
                f.seek(offset)
                data = f.read(size)
            yield {"fname": name, "data": data, "__url__": url}


def read_shard(url: str, counter: SkipCounter, mode: ReadMode) -> Iterator[RawSample]:
    """The complete (image + caption) samples of one shard; errors counted, never raised."""
    stream = None

    def stop(exn: Exception) -> bool:
        # A member that cannot be read means the tar stream is broken from there on.
        counter.skip(f"{url}: {exn}", url)
        return False

    def go_on(exn: Exception) -> bool:
        counter.skip(f"{url}: {exn}", url)
        return True

    try:
        path = local_path(url)
        if path is not None:
            members = _local_members(path, url, mode)
        else:
            stream = open_shard(url)
            members = ({**m, "__url__": url} for m in tar_file_iterator(stream, handler=stop))
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
