"""Progress of a long stage: a tqdm bar on a terminal, plain lines everywhere else.

Used by every stage that counts its way through work (the data build's prepare, crawl,
filter and shard steps; evaluation's feature extraction; the training loop's console
line), so a log file, a pipe, a CI job or a Slurm output file reads line by line:

    from pretrain.progress import progress
    for item in progress(items, desc="filter pass 1", unit="tar"): ...
    with progress(total=n, desc="crawl", unit="url") as bar:
        bar.update(k)

- stderr is a terminal: a tqdm bar (redrawn in place).
- otherwise: one line when ~10% more of the total is done or 30 s have passed, whichever
  comes first, plus a last line at the end; each with the count, the rate and, when the
  total is known, the ETA. No carriage returns. Example:
      [progress] crawl: 4194/8388 url (50%), 312 url/s, elapsed 0:13, ETA 0:13
- ``CLIP_PROGRESS=bar|lines|off`` forces one of the three.

``CLIP_VERBOSE=1`` (set by ``--verbose`` of the demo and of ``clip-data``) asks stages to
let libraries' own output through (img2dataset's prints, DeepSpeed's info lines, warnings
that are otherwise filtered); :func:`verbose` reads it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import IO, Any, Iterable, Iterator

from tqdm import tqdm

PROGRESS_ENV = "CLIP_PROGRESS"
VERBOSE_ENV = "CLIP_VERBOSE"
EVERY_FRACTION = 0.10
EVERY_SECONDS = 30.0


def verbose() -> bool:
    """Whether the user asked for libraries' own output (``CLIP_VERBOSE`` set, not 0)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false", "no")


def _mode(stream: IO[str]) -> str:
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if forced in ("bar", "lines", "off"):
        return forced
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # a closed or exotic stream
        return "lines"


def clock(seconds: float) -> str:
    """h:mm:ss (or m:ss under an hour)."""
    s = int(max(0.0, seconds) + 0.5)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _rate(n: float, elapsed: float, unit: str) -> str:
    r = n / elapsed if elapsed > 0 else 0.0
    if r >= 1 or r == 0:
        return f"{r:.3g} {unit}/s" if r < 100 else f"{r:.0f} {unit}/s"
    return f"{1 / r:.3g} s/{unit}"


class Pacer:
    """Says when a progress line is due: each ~`every_fraction` of `total`, or after
    `every_s` seconds without one. Shared by the line reporter and the training loop."""

    def __init__(self, total: float | None, every_fraction: float = EVERY_FRACTION,
                 every_s: float = EVERY_SECONDS) -> None:
        self.total = total if total and total > 0 else None
        self.every_fraction, self.every_s = every_fraction, every_s
        self.start = self.last_t = time.monotonic()
        self.next_n = self.total * every_fraction if self.total else float("inf")
        # (count, time) at the last two lines: the ETA uses the rate in between, so a slow
        # start (workers spawning) does not inflate it for the rest of the stage
        self._mark = self._prev = (0.0, self.start)

    def due(self, n: float) -> bool:
        """True when a line should be printed at count `n` (and records that it was)."""
        now = time.monotonic()
        if n >= self.next_n or now - self.last_t >= self.every_s:
            if self.total:
                # the next threshold above n: a big jump prints one line, not several
                step = self.total * self.every_fraction
                self.next_n = (int(n / step) + 1) * step
            self.last_t = now
            self._prev, self._mark = self._mark, (n, now)
            return True
        return False

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def eta(self, n: float) -> float | None:
        """Seconds left at the rate since the line before this one (the mean rate so far when
        there was no progress in between); None without a total or any progress."""
        if not self.total or n <= 0:
            return None
        left = max(0.0, self.total - n)
        prev_n, prev_t = self._prev
        now = time.monotonic()
        if n > prev_n and now > prev_t and prev_n > 0:
            return left * (now - prev_t) / (n - prev_n)
        return self.elapsed() * left / n

    def describe(self, n: float, unit: str) -> str:
        """'n/total unit (p%), rate, elapsed, ETA' for a line."""
        el = self.elapsed()
        if self.total:
            head = f"{n:g}/{self.total:g} {unit} ({100 * n / self.total:.0f}%)"
        else:
            head = f"{n:g} {unit}"
        parts = [head, _rate(n, el, unit), f"elapsed {clock(el)}"]
        if self.total:
            eta = self.eta(n)
            parts.append(f"ETA {clock(eta)}" if eta is not None else "ETA ?")  # "?": nothing done yet
        return ", ".join(parts)


class LineProgress:
    """The subset of tqdm's interface the stages use, printing paced lines (no '\\r')."""

    def __init__(self, iterable: Iterable[Any] | None = None, total: float | None = None, desc: str = "",
                 unit: str = "it", file: IO[str] | None = None, disable: bool = False,
                 every_fraction: float = EVERY_FRACTION, every_s: float = EVERY_SECONDS, **_: Any) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.file = file
        self.disable = disable
        self.n = 0
        self.postfix = ""
        self._pacer = Pacer(total, every_fraction, every_s)
        self._lock = threading.Lock()
        self._closed = False

    def _emit(self, final: bool = False) -> None:
        text = self._pacer.describe(self.n, self.unit)
        if final and self.total and self.n >= self.total:
            text = text.rsplit(", ETA", 1)[0] + ", done"
        extra = f" [{self.postfix}]" if self.postfix else ""
        stream = self.file or sys.stderr
        try:
            stream.write(f"[progress] {self.desc}: {text}{extra}\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed stream never stops the stage

    def update(self, n: float = 1) -> None:
        if self.disable:
            return
        with self._lock:
            self.n += n
            if self.total and self.n >= self.total:
                return  # the final line comes from close()
            if self._pacer.due(self.n):
                self._emit()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def close(self) -> None:
        with self._lock:
            if self._closed or self.disable:
                self._closed = True
                return
            self._closed = True
            self._emit(final=True)

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "no iterable given"
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str = "",
             unit: str = "it", disable: bool = False, file: IO[str] | None = None, nested: bool = False,
             **tqdm_kwargs: Any) -> Any:
    """A tqdm bar when `file` (default stderr) is a terminal, else a `LineProgress`.
    `nested`: an inner bar (one per task of a stage that has its own): a bar on a terminal,
    silent otherwise, so a log gets the stage's lines only. Extra keyword arguments go to
    tqdm only (position, leave...)."""
    stream = file or sys.stderr
    mode = "off" if disable else _mode(stream)
    if mode == "lines" and nested:
        mode = "off"
    if mode == "bar":
        tqdm_kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, **tqdm_kwargs)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, file=file, disable=mode == "off")
