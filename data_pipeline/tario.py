"""Deterministic tar writing and random access to tar members, for webdataset shards.

:func:`tar_bytes` builds a tar whose bytes depend only on its samples: members in the
given sample order with their extensions sorted, mtime 0, uid/gid 0, no user names, mode
0o444 -- so rebuilding a shard (after a crash, or on another machine) gives identical bytes.

:class:`TarIndex` reads a tar's headers once and then fetches single members by name with
one ranged read each (works on local files and object stores through fsspec).

    data = tar_bytes([("000000001", {"jpg": b"...", "txt": b"a cat", "json": b"{}"})])
    idx = TarIndex("crawl/00000.tar"); idx.read("000000017.jpg")
"""
from __future__ import annotations

import io
import tarfile
import threading
from typing import Iterable

from data_pipeline import fsutil


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


class TarIndex:
    """Member name -> (offset, size) of one tar, read lazily; thread-safe reads."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._index: dict[str, tuple[int, int]] | None = None
        self._lock = threading.Lock()

    def index(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            if self._index is None:
                fs, path = fsutil.url_to_fs(self.url)
                idx: dict[str, tuple[int, int]] = {}
                with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
                    for m in tf:
                        if m.isfile():
                            idx[m.name] = (m.offset_data, m.size)
                self._index = idx
            return self._index

    def read(self, name: str) -> bytes:
        idx = self.index()
        if name not in idx:
            raise KeyError(f"{name} not in {self.url}")
        offset, size = idx[name]
        fs, path = fsutil.url_to_fs(self.url)
        with fs.open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.url}: short read of {name} ({len(data)} of {size} bytes)")
        return data
