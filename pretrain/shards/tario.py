"""Webdataset tars: deterministic writing, and the one reader of a tar's member index.

:func:`tar_bytes` builds a tar whose bytes depend only on its samples: members in the
given sample order with their extensions sorted, mtime 0, uid/gid 0, no user names, mode
0o444, so rebuilding a shard (after a crash, or on another machine) gives identical bytes.

:func:`scan_members` walks a tar's headers by seeking over the data (``tarfile`` reads
512-byte headers only) and yields every regular member as ``(name, offset, size)``. A
damaged tar is judged from the headers alone: a member whose data runs past the end of the
file, or a missing end-of-archive marker (a file cut at a header boundary, where
``tarfile`` ends quietly), raises :class:`TruncatedTarError` after every complete member
before the damage was yielded. Every reader uses it: the data build's random access
(:class:`TarIndex`), the trainer's shard reader (pretrain/data/tar_reader.py) and
evaluation's index (pretrain/eval/tario.py).

    data = tar_bytes([("000000001", {"jpg": b"...", "txt": b"a cat", "json": b"{}"})])
    idx = TarIndex("crawl/00000.tar"); idx.read("000000017.jpg")
    with open(path, "rb") as f:
        for name, offset, size in scan_members(f, path): ...
"""
from __future__ import annotations

import io
import tarfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO


class TruncatedTarError(tarfile.ReadError):
    """The tar ends before its last member's data or its end-of-archive marker."""


def tar_bytes(samples: Iterable[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, parts in samples:
            if "." in key or "/" in key:
                raise ValueError(f"sample key {key!r} must not contain '.' or '/' (webdataset splits on them)")
            for ext in sorted(parts):
                data = parts[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o444
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def open_binary(url: str) -> IO[bytes]:
    """A seekable binary file of a local path or any fsspec URL."""
    if _is_local(url):
        return open(_local_path(url), "rb", buffering=1 << 16)
    import fsspec

    return fsspec.open(url, "rb").open()


@dataclass(frozen=True)
class Member:
    """The byte range of one tar member; ``read`` fetches it with one seek (or ranged read)."""

    url: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open_binary(self.url) as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"short read in {self.url} at {self.offset}: {len(data)} of {self.size} bytes")
        return data


def scan_members(f: IO[bytes], url: str) -> Iterator[tuple[str, int, int]]:
    """``(name, data offset, size)`` of every regular member of the open tar ``f`` (see the
    module docstring for damage). ``f`` may be read between items: each header read seeks."""
    file_size = f.seek(0, 2)
    f.seek(0)
    tar = tarfile.open(fileobj=f, mode="r:")
    for info in tar:
        tar.members = []  # webdataset-sized shards: do not keep every header
        if not info.isreg():
            continue
        if info.offset_data + info.size > file_size:
            raise TruncatedTarError(f"{url}: unexpected end of data in member {info.name}")
        yield info.name, info.offset_data, info.size
    if file_size < tar.offset + 2 * tarfile.BLOCKSIZE:
        raise TruncatedTarError(f"{url}: no end-of-archive marker (truncated?)")


class TarIndex:
    """Member name -> :class:`Member` of one tar (the first of a repeated name), read
    lazily once; thread-safe reads.
    A damaged tar raises :class:`TruncatedTarError` (the data build's own tars are whole)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._index: dict[str, Member] | None = None
        self._lock = threading.Lock()

    def index(self) -> dict[str, Member]:
        with self._lock:
            if self._index is None:
                index: dict[str, Member] = {}
                with open_binary(self.url) as f:
                    for name, off, size in scan_members(f, self.url):
                        # A repeated name: the first copy, the one the data build's
                        # filter judged (it rejects later copies of a key).
                        index.setdefault(name, Member(self.url, off, size))
                self._index = index
            return self._index

    def read(self, name: str) -> bytes:
        member = self.index().get(name)
        if member is None:
            raise KeyError(f"{name} not in {self.url}")
        return member.read()
