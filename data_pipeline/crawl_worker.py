"""One crawl shard, run under a watchdog: img2dataset's shard downloader in a child process
that is killed when it overruns, and retried.

img2dataset's distributors (a multiprocessing pool, Spark tasks, Ray tasks) call the
downloader object once per crawl shard. :class:`CrawlDownloader` is that object; in the
distributor's worker it does not download itself but starts
a child process (forked when the worker is single-threaded, else ``python -m
data_pipeline.crawl_worker JOB``; never a multiprocessing child, so it works inside the
pool's daemonic workers and on Spark/Ray executors alike) and waits for it:

- the child runs img2dataset's ``Downloader.download_shard`` with the crawl's own fetcher
  (:mod:`data_pipeline.fetch`: User-Agent, opt-out headers, retries, deadlines) in place of
  img2dataset's per-URL function, and a cooperative shard deadline
  (``crawl.shard_deadline``: no download starts after it, those samples count as
  ``crawl/shard_deadline``);
- the watchdog kills the child once it has run
  ``shard_deadline + download_deadline + shard_grace_s`` seconds (every download of it
  has ended by then unless the process is stuck) and starts it again, at most
  ``crawl.max_shard_retry`` more times; a shard whose last attempt was killed is written
  as finished with every sample failed as ``crawl/shard_killed`` (transient: a
  ``--retry-failed`` run fetches them again), so the build never hangs on it. Each kill is
  recorded in ``OUT/crawl/NNNNN_watchdog.json``. A child that exits with an error every
  time (never expected) leaves its samples as ``crawl/shard_failed``. The child stays in
  the worker's process group and ends itself when the worker is gone; the worker ends
  itself and the child when the crawl's driver is gone (a killed build leaves nothing
  crawling behind).

    python -m data_pipeline.crawl_worker OUT/crawl/_tmp/12.job   # what the watchdog runs
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Protocol

from img2dataset import downloader as i2d_downloader
from img2dataset.downloader import Downloader, compute_key
from img2dataset.logger import CappedCounter, write_stats

from data_pipeline import fsutil
from data_pipeline.crawl import WATCHDOG_SUFFIX
from data_pipeline.fetch import SHARD_FAILED, SHARD_KILLED, FetchSettings, Fetcher, tagged


class CrawlDownloader(Downloader):
    """img2dataset's Downloader plus the crawl's fetcher and the watchdog (module docstring)."""

    def __init__(self, *, fetch: FetchSettings, shard_deadline: float, grace_s: float, max_shard_retry: int,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fetch = fetch
        self.shard_deadline = float(shard_deadline)
        self.kill_after = float(shard_deadline) + fetch.deadline + float(grace_s)
        self.attempts = 1 + max(0, int(max_shard_retry))

    # ---- in the distributor's worker ---------------------------------------------------
    def __call__(self, row: tuple[int, str]) -> tuple[bool, tuple[int, str]]:
        shard_id, shard_file = row
        job = f"{shard_file}.job"
        kills = 0
        try:
            for _ in range(self.attempts):
                outcome = self._attempt(job, row)
                if outcome == "done":
                    return True, row
                if outcome == "killed":
                    kills += 1
                    self._record_kills(shard_id, kills)
            if fsutil.exists(shard_file):
                self._write_failed(row, SHARD_KILLED if kills else SHARD_FAILED)
            return True, row
        except Exception as err:  # noqa: BLE001 - img2dataset's distributor retries a False
            print(f"crawl shard {shard_id} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            return False, row
        finally:
            fs, path = fsutil.url_to_fs(job)
            if fs.exists(path):
                fs.rm(path)

    def _attempt(self, job: str, row: tuple[int, str]) -> str:
        # Same process group as this worker: whoever kills the build's group kills it too.
        parent = os.getppid()
        if threading.active_count() == 1:
            # A single-threaded worker (a pool worker, a Spark Python worker) forks: no second
            # interpreter start and import (img2dataset pulls in torch through webdataset:
            # seconds per shard). Forking a process with other threads is unsafe: then exec.
            pid = os.fork()
            if pid == 0:
                _run_child(self, row)
            child: _Child = _Forked(pid)
        else:
            # Always written afresh by this process just before the child reads it: a job
            # file found in the output directory (left by a crash, or put there by anyone who
            # can write to it) is never the one unpickled.
            with fsutil.atomic_open(job) as f:
                pickle.dump((self, row), f)
            env = dict(os.environ)
            # The child must import this package wherever the worker found it (Ray executors).
            env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
            child = _Exec(subprocess.Popen([sys.executable, "-m", "data_pipeline.crawl_worker", job], env=env))
        end = time.monotonic() + self.kill_after
        while True:
            rc = child.poll()
            if rc is not None:
                return "done" if rc == 0 else "failed"
            if os.getppid() != parent:  # the crawl's driver is gone: so is this shard's reason to run
                child.kill()
                os._exit(1)
            if time.monotonic() >= end:
                child.kill()
                print(f"crawl watchdog: killed {job} after {self.kill_after:g} s", file=sys.stderr, flush=True)
                return "killed"
            time.sleep(0.05)

    def _record_kills(self, shard_id: int, kills: int) -> None:
        name = f"{shard_id:0{self.oom_shard_count}d}{WATCHDOG_SUFFIX}"
        fsutil.write_json(fsutil.join(self.output_folder, name), {"kills": kills, "kill_after_s": self.kill_after})

    def _write_failed(self, row: tuple[int, str], reason: str) -> None:
        """The shard as finished, every sample failed with ``reason`` (same files as a real run)."""
        import math

        import pyarrow as pa

        shard_id, shard_file = row
        fs, path = fsutil.url_to_fs(shard_file)
        with fs.open(path, "rb") as f:
            df = pa.ipc.open_file(f).read_all()
        schema = df.schema
        for name, typ in (("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
                          ("width", pa.int32()), ("height", pa.int32()), ("original_width", pa.int32()),
                          ("original_height", pa.int32())):
            schema = schema.append(pa.field(name, typ))
        if self.compute_hash is not None and self.compute_hash not in schema.names:
            schema = schema.append(pa.field(self.compute_hash, pa.string()))
        writer = self.sample_writer_class(shard_id, self.output_folder, self.save_caption, self.oom_shard_count,
                                          schema, self.encode_format)
        oom_sample = math.ceil(math.log10(self.number_sample_per_shard))
        message = tagged(reason, f"the crawl shard's process was killed by the watchdog after {self.kill_after:g} s"
                         if reason == SHARD_KILLED else f"the crawl shard's process failed {self.attempts} time(s)")
        cols = df.select(self.column_list).to_pydict()
        status = CappedCounter()
        t0 = time.time()
        n = df.num_rows
        for i in range(n):
            meta = {c: cols[c][i] for c in self.column_list}
            key = compute_key(i, shard_id, oom_sample, self.oom_shard_count)
            meta.update({"key": key, "status": "failed_to_download", "error_message": message, "width": None,
                         "height": None, "original_width": None, "original_height": None})
            if self.compute_hash is not None:
                meta[self.compute_hash] = None
            status.increment(message)
            writer.write(None, key, meta.get("caption"), meta)
        writer.close()
        write_stats(self.output_folder, shard_id, n, 0, n, 0, t0, time.time(), status, self.oom_shard_count)
        fs.rm(path)

    # ---- in the child ------------------------------------------------------------------
    def run_shard(self, row: tuple[int, str]) -> None:
        fetcher = Fetcher(self.fetch, shard_deadline_at=time.monotonic() + self.shard_deadline)
        # download_shard looks this name up in its module for every URL.
        i2d_downloader.download_image_with_retry = fetcher  # type: ignore[assignment]
        self.download_shard(row)


class _Child(Protocol):
    """A shard's crawl process, as the watchdog sees it."""

    def poll(self) -> int | None: ...

    def kill(self) -> None: ...


class _Exec(_Child):
    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class _Forked(_Child):
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> int | None:
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        return None if pid == 0 else os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)


def _run_child(downloader: CrawlDownloader, row: tuple[int, str]) -> None:
    """The forked child: run the shard, never return into the worker's code."""
    code = 1
    try:
        _exit_with_parent()
        downloader.run_shard(row)
        code = 0
    except BaseException:  # noqa: BLE001 - reported, and the exit status tells the watchdog
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _exit_with_parent() -> None:
    """Stop when the watchdog's process is gone (killed), instead of crawling on unseen."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    _exit_with_parent()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m data_pipeline.crawl_worker JOB", file=sys.stderr)
        return 2
    fs, path = fsutil.url_to_fs(args[0])
    with fs.open(path, "rb") as f:
        downloader, row = pickle.load(f)  # written afresh by this crawl's watchdog just before (above)
    downloader.run_shard(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
