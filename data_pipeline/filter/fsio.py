"""Small fsspec helpers of the filter stage: atomic parquet writes and tar sample reading.

Every file is written under a temporary name beside its target and renamed when complete,
so a reader (or a resumed run) never sees half a file.
"""
from __future__ import annotations

import os
import re
import tarfile
import uuid
from collections.abc import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem
import pyarrow as pa
import pyarrow.parquet as pq

# webdataset's rule: the key is the path up to the first dot of the file's base name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def tar_stem(tar: str) -> str:
    """'s3://b/crawl/00012.tar' -> '00012' (the per-shard record's name)."""
    name = tar.rstrip("/").rsplit("/", 1)[-1]
    return name[:-4] if name.endswith(".tar") else name


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path, exist_ok=True)


def write_parquet_atomic(table: pa.Table, url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    if isinstance(fs, LocalFileSystem):
        os.replace(tmp, path)  # atomic on POSIX
    else:
        fs.mv(tmp, path)  # object stores: the object appears complete or not at all


def read_parquet(url: str) -> pa.Table:
    with fsspec.open(url, "rb") as f:
        return pq.read_table(f)


def read_parquet_metadata(url: str) -> dict[bytes, bytes]:
    with fsspec.open(url, "rb") as f:
        return pq.read_schema(f).metadata or {}


def iter_tar_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) for consecutive members sharing a key, in tar order.

    A corrupt or truncated tar raises ValueError naming the file (its remaining samples
    cannot be counted, so failing loudly beats dropping them unseen).
    """
    with fsspec.open(url, "rb") as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r|*") as tf:
                key: str | None = None
                parts: dict[str, bytes] = {}
                for member in tf:
                    if not member.isfile():
                        continue
                    m = _KEY_EXT.match(member.name)
                    if m is None:
                        continue  # a file with no extension is not part of a sample
                    k, ext = m.group(1), m.group(2).lower()
                    f = tf.extractfile(member)
                    data = f.read() if f is not None else b""
                    if k != key:
                        if key is not None:
                            yield key, parts
                        key, parts = k, {}
                    parts[ext] = data
                if key is not None:
                    yield key, parts
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ValueError(f"{url}: unreadable tar ({type(e).__name__}: {e})") from e


def remove_temporaries(dir_url: str) -> int:
    """Delete ``.tmp-*`` files a killed writer left in ``dir_url``; returns how many."""
    fs, path = fsspec.core.url_to_fs(dir_url)
    if not fs.exists(path):
        return 0
    stale = [p for p in fs.ls(path, detail=False) if p.rstrip("/").rsplit("/", 1)[-1].startswith(".tmp-")]
    for p in stale:
        fs.rm(p)
    return len(stale)
