"""The one file-system module of the project (data build, trainer, eval): fsspec paths and
URLs, atomic writes, the temp-file sweeper and one-owner directory locks. No project imports.

Atomic writes: the bytes go to a hidden temporary name beside the target (`.NAME.tmp-PID-XXXX`,
which globs such as `*.tar` never match) and are renamed into place when complete, so a
reader never sees half a file: after a crash (even `kill -9`) a path holds the old file, the
new file, or nothing. On a local file system (including NFS/Lustre mounts) the file is also
fsynced before the rename and its directory after it, so the new name survives a power loss
too; object stores publish an object whole or not at all (the temporary is moved with
`fs.mv`).

    with atomic_open("s3://bucket/out/shards/00000.tar") as f:
        f.write(data)
    write_json("runs/a/eval/step_00000100.json", results)

Temporary files: a local writer holds a shared `flock` on its temporary for the whole write
(the kernel drops it when the writer dies, even by SIGKILL), so `remove_stale_tmp` deletes a
local temporary only when no live process holds it; on object stores, where nothing can be
locked, only temporaries older than `REMOTE_STALE_S`.

Directory locks: `hold_dir(path, purpose)` takes an exclusive `flock` on `PATH/.lock` (which
records host, pid, start time and command) for as long as the process holds it; a second
process gets `DirBusyError` naming the holder; a crashed holder's lock is released by the
kernel. Local (and NFS, where Linux emulates flock with fcntl locks) paths only: for object
store URLs no lock is taken and a warning says so (S3 and friends have no lock a dying
process releases).
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from typing import IO, Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

TMP_MARK = ".tmp-"
LOCK_NAME = ".lock"
REMOTE_STALE_S = 3600.0  # an object-store temporary this old is a killed writer's debris


class DirBusyError(RuntimeError):
    """The directory is locked by another live process."""


# --- paths -----------------------------------------------------------------------------------
def url_to_fs(url: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(os.fspath(url))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(base: str, *parts: str) -> str:
    """Join URL/path parts with '/', keeping the protocol of ``base``."""
    out = os.fspath(base).rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def exists(url: str | os.PathLike) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def makedirs(url: str | os.PathLike) -> None:
    fs, path = url_to_fs(url)
    fs.makedirs(path, exist_ok=True)


def glob(pattern: str) -> list[str]:
    """Sorted matches of ``pattern``, returned with the pattern's protocol."""
    fs, path = url_to_fs(pattern)
    protocol = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
    return sorted(protocol + p if protocol and not p.startswith(protocol) else p for p in fs.glob(path))


# --- durability ------------------------------------------------------------------------------
def fsync_dir(path: str | os.PathLike) -> None:
    """Make a local directory's entries (a rename, a new file) durable."""
    fd = os.open(os.fspath(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a directory: nothing more to do there
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file and directory below a local ``path``, then ``path``'s own entry in its
    parent (e.g. files another library wrote without fsync, before a marker vouches for them)."""
    root = os.fspath(path)
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except FileNotFoundError:  # another writer's temporary, renamed meanwhile
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)
    fsync_dir(os.path.dirname(os.path.abspath(root)))


def _tmp_name(path: str) -> str:
    head, _, name = path.rpartition("/")
    tmp = f".{name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return f"{head}/{tmp}" if head else tmp


def _open_locked_tmp(path: str) -> tuple[int, str]:
    """Create and share-lock a local temporary for ``path``. A sweeper deletes a temporary only
    while holding its exclusive lock, so once we hold ours and the name still points at our
    file, nobody can take it from under us (a sweep between create and lock: try a new name)."""
    while True:
        tmp = _tmp_name(path)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return fd, tmp
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def atomic_open(url: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open ``url`` for writing under a temporary name; rename it into place on success
    (local: fsync file, rename, fsync directory)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes only ('wb' or 'w'), got {mode!r}")
    fs, path = url_to_fs(url)
    parent = path.rpartition("/")[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_local(fs):
        fd, tmp = _open_locked_tmp(path)
        try:
            with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())  # the bytes reach the disk before the name does
                os.replace(tmp, path)  # still holding the lock: a sweeper never sees it unlocked
            fsync_dir(parent or ".")
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return
    tmp = _tmp_name(path)
    try:
        with fs.open(tmp, mode) as f:
            yield f
        fs.mv(tmp, path)
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except Exception:  # noqa: BLE001 - cleanup must not hide the real error
            pass
        raise


def write_bytes(url: str | os.PathLike, data: bytes) -> None:
    with atomic_open(url, "wb") as f:
        f.write(data)


def write_text(url: str | os.PathLike, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """Canonical JSON text (sorted keys, fixed indent, trailing newline): byte-stable."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def write_json(url: str | os.PathLike, obj: Any) -> None:
    write_bytes(url, dumps_json(obj).encode("utf-8"))


def read_bytes(url: str | os.PathLike) -> bytes:
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        return f.read()


def read_json(url: str | os.PathLike) -> Any:
    return json.loads(read_bytes(url).decode("utf-8"))


# --- temporaries -----------------------------------------------------------------------------
def _held_by_live_writer(path: str) -> bool:
    """Whether a live process holds ``path``'s lock; if not, unlink it under our own lock."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True  # renamed into place meanwhile: not ours to touch
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
        return False
    except FileNotFoundError:
        return True
    finally:
        os.close(fd)


def _age_s(info: dict[str, Any], now: float) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(key)
        if isinstance(v, _dt.datetime):
            v = v.timestamp()
        elif isinstance(v, str):
            try:
                v = _dt.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
        if isinstance(v, (int, float)):
            return now - float(v)
    return None


def remove_stale_tmp(dir_url: str | os.PathLike, remote_stale_s: float = REMOTE_STALE_S) -> int:
    """Delete the temporaries a killed writer left in ``dir_url``; returns how many.

    Local: those no live process holds (a writer's lock goes with it when it dies). Object
    stores: those older than ``remote_stale_s`` (age unknown: left alone)."""
    fs, path = url_to_fs(dir_url)
    if not fs.exists(path):
        return 0
    removed = 0
    now = time.time()
    for info in fs.ls(path, detail=True):
        name = info["name"]
        if TMP_MARK not in name.rstrip("/").rpartition("/")[2] or info.get("type") != "file":
            continue
        if is_local(fs):
            removed += not _held_by_live_writer(name)
        else:
            age = _age_s(info, now)
            if age is not None and age >= remote_stale_s:
                fs.rm(name)
                removed += 1
    return removed


# --- one owner per directory -----------------------------------------------------------------
_held: dict[str, list[Any]] = {}  # real path -> [fd, depth]: re-entrant within one process


def _holder(lock_path: str) -> str:
    try:
        with open(lock_path, encoding="utf-8") as f:
            rec = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        rec = {}
    if not rec:
        return "another process (holder not recorded yet)"
    return (f"{rec.get('purpose') or 'a process'} pid {rec.get('pid')} on host {rec.get('host')} "
            f"since {rec.get('started')} ({rec.get('command', '')})")


def lock_dir(url: str | os.PathLike, purpose: str = "") -> bool:
    """Take (or re-enter) the exclusive lock of a directory for this process; it holds until
    `unlock_dir` or the process ends. Returns False (with a warning) where no lock exists
    (object stores). Raises DirBusyError naming the holder."""
    fs, path = url_to_fs(url)
    if not is_local(fs):
        log.warning("%s is not on a local or network-mounted file system: it is NOT locked, so "
                    "nothing stops a second process from writing there at the same time", url)
        return False
    os.makedirs(path, exist_ok=True)
    key = os.path.realpath(path)
    if key in _held:
        _held[key][1] += 1
        return True
    lock_path = os.path.join(key, LOCK_NAME)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DirBusyError(f"{path} is in use by {_holder(lock_path)}; lock file {lock_path}. "
                           "Wait for it to end, stop it, or use another directory.") from None
    record = {"purpose": purpose, "host": socket.gethostname(), "pid": os.getpid(),
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
    os.fsync(fd)
    _held[key] = [fd, 1]
    return True


def unlock_dir(url: str | os.PathLike) -> None:
    fs, path = url_to_fs(url)
    key = os.path.realpath(path)
    if key not in _held:
        return
    _held[key][1] -= 1
    if _held[key][1] == 0:
        fd = _held.pop(key)[0]
        os.close(fd)  # releases the flock; the file stays (deleting it would race a new holder)


@contextmanager
def hold_dir(url: str | os.PathLike, purpose: str = "") -> Iterator[None]:
    """`with hold_dir(out, "data build"):` the directory is this process's until the block ends."""
    locked = lock_dir(url, purpose)
    try:
        yield
    finally:
        if locked:
            unlock_dir(url)
