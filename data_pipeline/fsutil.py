"""Small fsspec helpers: atomic writes (temporary name, then rename) and JSON I/O.

Every file the data build publishes goes through :func:`atomic_open`, so a reader never
sees a half-written tar, parquet or manifest: after a crash (even ``kill -9``) a path
either holds the complete file or does not exist, and a rerun only has to check
existence to know what is finished.

    with atomic_open("s3://bucket/out/shards/00000.tar") as f:
        f.write(data)
"""
from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from typing import IO, Any, Iterator

import fsspec

TMP_MARK = ".tmp-"


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url)


def join(base: str, *parts: str) -> str:
    """Join URL/path parts with '/', keeping the protocol of ``base``."""
    out = base.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    fs, path = url_to_fs(url)
    fs.makedirs(path, exist_ok=True)


def glob(pattern: str) -> list[str]:
    """Sorted matches of ``pattern``, returned with the pattern's protocol."""
    fs, path = url_to_fs(pattern)
    protocol = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
    return sorted(protocol + p if protocol and not p.startswith(protocol) else p for p in fs.glob(path))


def _tmp_name(path: str) -> str:
    head, _, name = path.rpartition("/")
    # Hidden and with a suffix after the extension: globs such as "*.tar" never match it.
    tmp = f".{name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return f"{head}/{tmp}" if head else tmp


@contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open ``url`` for writing under a temporary name; rename it into place on success."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes only ('wb' or 'w'), got {mode!r}")
    fs, path = url_to_fs(url)
    parent = path.rpartition("/")[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with fs.open(tmp, mode) as f:
            yield f
            f.flush()
            fileno = getattr(f, "fileno", None)
            if fileno is not None and "file" in fs.protocol:
                try:
                    os.fsync(fileno())  # survive power loss, not only kill -9
                except (OSError, ValueError, AttributeError):
                    pass
        fs.mv(tmp, path)
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except Exception:  # noqa: BLE001 - cleanup must not hide the real error
            pass
        raise


def write_bytes(url: str, data: bytes) -> None:
    with atomic_open(url, "wb") as f:
        f.write(data)


def dumps_json(obj: Any) -> str:
    """Canonical JSON text (sorted keys, fixed indent, trailing newline): byte-stable."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, dumps_json(obj).encode("utf-8"))


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def read_json(url: str) -> Any:
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def read_bytes(url: str) -> bytes:
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        return f.read()


def remove_stale_tmp(dir_url: str) -> int:
    """Delete temporary files left by a killed run in ``dir_url``; returns how many."""
    fs, path = url_to_fs(dir_url)
    if not fs.exists(path):
        return 0
    stale = [p for p in fs.ls(path, detail=False) if TMP_MARK in p.rpartition("/")[2]]
    for p in stale:
        fs.rm(p)
    return len(stale)
