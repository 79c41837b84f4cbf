"""The filter stage's file helpers: parquet and tar sample reading, atomic parquet writes.

Paths, existence, atomic writes and the temp-file sweeper are the project's one fs module
(`pretrain.fs`, re-exported here under the names the filter uses): every file is written
under a temporary name beside its target, fsynced and renamed when complete, so a reader
(or a resumed run) never sees half a file.
"""
from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pretrain.fs import atomic_open, exists, join, makedirs  # noqa: F401 - re-exported
from pretrain.fs import remove_stale_tmp as remove_temporaries  # noqa: F401 - re-exported

# webdataset's rule: the key is the path up to the first dot of the file's base name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def tar_stem(tar: str) -> str:
    """'s3://b/crawl/00012.tar' -> '00012' (the per-shard record's name)."""
    name = tar.rstrip("/").rsplit("/", 1)[-1]
    return name[:-4] if name.endswith(".tar") else name


def write_parquet_atomic(table: pa.Table, url: str) -> None:
    with atomic_open(url, "wb") as f:
        pq.write_table(table, f)


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
                    # A member repeated within a sample: the first copy, as the shard
                    # stage's tar index reads it (pretrain.shards.tario.TarIndex).
                    parts.setdefault(ext, data)
                if key is not None:
                    yield key, parts
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ValueError(f"{url}: unreadable tar ({type(e).__name__}: {e})") from e

