"""What the crawl shows while img2dataset runs: its own progress, not img2dataset's output.

img2dataset prints from its main process, its logger process and every download worker
(a tqdm counter without a total, per-shard status lines, tracebacks of single samples):
written to a log file or a pipe these become carriage-return fragments and hundreds of
lines. During the download this module sends file descriptors 1 and 2 (inherited by the
spawned workers, pyspark's JVM and local Ray alike) to ``OUT/crawl/img2dataset.log``
(appended to on a rerun; a local temporary file copied there at the end when the output is
remote) and reports progress itself from the egress proxy's request count, which every
fetch passes (:func:`pretrain.progress.progress`: a bar on a terminal, paced lines
elsewhere). When img2dataset fails, the log's last lines are printed with the error.
``--verbose`` (``CLIP_VERBOSE=1``) leaves img2dataset's output as it is.

    with crawl_output(layout.crawl_dir, total=n_urls, count=lambda: proxy.counts().get("requests", 0)):
        img2dataset.download(...)
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
from contextlib import contextmanager
from typing import IO, Callable, Iterator

from data_pipeline import fsutil
from pretrain.progress import progress, verbose

LOG_NAME = "img2dataset.log"
TAIL_LINES = 20


def _local_path(url: str) -> str | None:
    fs, path = fsutil.url_to_fs(url)
    return path if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)) else None


@contextmanager
def _fds_to(path: str) -> Iterator[IO[str]]:
    """fds 1 and 2 appended to `path` for the duration; yields a stream on the old stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    # closefd=False: the saved descriptor is restored below, not closed by the stream
    terminal = open(saved[2], "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    try:
        for fd in (1, 2):
            os.dup2(log_fd, fd)
        yield terminal
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        terminal.flush()
        for fd, old in saved.items():
            os.dup2(old, fd)
            os.close(old)
        os.close(log_fd)
        terminal.close()


def _tail(path: str, lines: int = TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    # carriage-return redraws: keep the last state of each line
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])


@contextmanager
def crawl_output(crawl_dir: str, total: int, count: Callable[[], int], desc: str = "crawl: download",
                 poll_s: float = 1.0) -> Iterator[None]:
    """img2dataset's output to the crawl's log file, progress from `count()` (clamped to
    `total`: retries and redirect hops pass the proxy too; 0: unknown) every `poll_s` seconds."""
    if verbose():
        yield
        return
    fsutil.makedirs(crawl_dir)
    local = _local_path(fsutil.join(crawl_dir, LOG_NAME))
    path = local or os.path.join(tempfile.mkdtemp(prefix="clip-data-crawl-"), LOG_NAME)
    if local is None and fsutil.exists(fsutil.join(crawl_dir, LOG_NAME)):
        with open(path, "wb") as f:  # a rerun appends to the log the output already holds
            f.write(fsutil.read_bytes(fsutil.join(crawl_dir, LOG_NAME)))
    stop = threading.Event()
    try:
        with _fds_to(path) as terminal:
            bar = progress(total=total or None, desc=desc, unit="url", file=terminal)

            def poll() -> None:
                done = 0
                while True:
                    stopping = stop.wait(poll_s)
                    now = (min(total, count()) if total > 0 else count())
                    # update(0) too: a line every ~30 s also while img2dataset starts its workers
                    bar.update(max(0, now - done))
                    done = max(done, now)
                    if stopping:
                        return

            thread = threading.Thread(target=poll, name="crawl-progress", daemon=True)
            thread.start()
            try:
                yield
            except BaseException:
                stop.set()
                thread.join(timeout=10)
                terminal.write(f"img2dataset's output is in {fsutil.join(crawl_dir, LOG_NAME)}; its last "
                               f"lines:\n{_tail(path)}\n")
                raise
            finally:
                stop.set()
                thread.join(timeout=10)
                bar.close()
    finally:
        if local is None:
            with open(path, "rb") as f:
                fsutil.write_bytes(fsutil.join(crawl_dir, LOG_NAME), f.read())
