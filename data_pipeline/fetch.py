"""One image download of the crawl, as img2dataset's worker threads run it: the crawl's own
User-Agent, the opt-out response headers, retries with backoff, a per-download deadline.

img2dataset calls ``download_image_with_retry(row, timeout, retries, ...)`` per URL; the
crawl worker (:mod:`data_pipeline.crawl_worker`) puts :meth:`Fetcher.__call__` in its place
inside each crawl process. Every request still goes through the egress proxy (urllib reads
the proxy variables), which enforces the address policy, the body cap, the hard
per-connection deadline and the per-host politeness limits (:mod:`data_pipeline.politeness`).

- User-Agent: ``<crawl.user_agent>/1.0 (+<crawl.contact_url>)``, the same string as the
  robots.txt / tdmrep.json fetches (:func:`data_pipeline.optout.user_agent_string`).
- Opt-outs in the response headers: ``X-Robots-Tag`` directives
  (``crawl.disallowed_header_directives``, for all robots or ``<token>:`` ours) ->
  ``download/opt_out``; TDM-Rep's ``tdm-reservation: 1`` (W3C TDM Reservation Protocol,
  section 3.3) -> ``optout/tdm_reservation_header``. Either way the body is not read.
- Transient failures (socket timeouts, connection errors and resets, HTTP 408, 425, 429,
  502, 503, 504) are retried up to ``crawl.retries`` times, after ``Retry-After`` (seconds
  or an HTTP-date) when the server sent one, else after ``crawl.backoff_s * 2**attempt``
  with full jitter. A ``Retry-After`` longer than ``crawl.max_retry_after_s`` is not waited
  for: the URL fails now (transiently: ``--retry-failed`` fetches it in a later run).
  Permanent failures (other 4xx/5xx, egress refusals, opt-outs, a body that is no image)
  are never retried.
- The egress proxy's ``politeness/host_busy`` answer (the host already has its share of
  connections, or its next slot is later) is waited for without using up a retry, for at
  most ``crawl.host_wait_s`` per URL in all; then the URL fails as ``politeness/host_busy``.
- Per download: the proxy cuts each connection (one attempt or redirect hop) after
  ``crawl.download_deadline`` seconds; a head that never came is its ``504
  safety/deadline``, a body cut then (a server dripping bytes) fails here as
  ``download/deadline``. This client gives up on its own only well after that (a backstop).
- A crawl shard's cooperative deadline (``crawl.shard_deadline``, set by the crawl worker):
  no download starts after it (``crawl/shard_deadline``) and no backoff sleeps past it.

Every failure message starts with its counted reason in brackets, ``[download/timeout]
<urllib's text>``, which :func:`data_pipeline.crawl_counts.classify` reads back; the text
after it may come from the server, the bracket never does. :data:`TRANSIENT` lists the
reasons a ``--retry-failed`` run fetches again.
"""
from __future__ import annotations

import email.utils
import http.client
import io
import random
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

from data_pipeline.egress import CONNECTION_ERROR, DEADLINE, REASONS as EGRESS_REASONS
from data_pipeline.politeness import HOST_BUSY, queue_seconds

OPT_OUT_HEADER = "download/opt_out"
TDM_RESERVATION_HEADER = "optout/tdm_reservation_header"
HTTP_ERROR = "download/http_error"
TOO_MANY_REQUESTS = "download/too_many_requests"
UNAVAILABLE = "download/unavailable"
TIMEOUT = "download/timeout"
CONNECTION = "download/connection_error"
TRUNCATED = "download/truncated"
DOWNLOAD_DEADLINE = "download/deadline"
DOWNLOAD_ERROR = "download/error"
SHARD_DEADLINE = "crawl/shard_deadline"
SHARD_KILLED = "crawl/shard_killed"
SHARD_FAILED = "crawl/shard_failed"
# Reasons worth another try later (``--retry-failed``): the same request may well succeed.
TRANSIENT = frozenset({TOO_MANY_REQUESTS, UNAVAILABLE, TIMEOUT, CONNECTION, TRUNCATED, DOWNLOAD_DEADLINE,
                       HOST_BUSY, SHARD_DEADLINE, SHARD_KILLED, DEADLINE, CONNECTION_ERROR})
# Retried within the run, with backoff. A deadline or a truncated body is not: a server
# that drips bytes drips again, and each try would cost a whole deadline.
RETRY_NOW = frozenset({TOO_MANY_REQUESTS, UNAVAILABLE, TIMEOUT, CONNECTION, CONNECTION_ERROR})
TRANSIENT_STATUS = {408: UNAVAILABLE, 425: UNAVAILABLE, 429: TOO_MANY_REQUESTS, 502: UNAVAILABLE,
                    503: UNAVAILABLE, 504: UNAVAILABLE}
_TAGGED = re.compile(r"^\[([a-z]+/[a-z_]+)\] ")
_PROXY_TUNNEL = re.compile(r"Tunnel connection failed: \d{3} ([a-z]+/[a-z_]+)(?![\w/])")
_CHUNK = 64 * 1024


def tagged(reason: str, text: str) -> str:
    return f"[{reason}] {text}"


def tag_of(message: str | None) -> str | None:
    """The reason a :class:`Fetcher` failure message starts with, or None."""
    m = _TAGGED.match(message or "")
    return m.group(1) if m else None


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` (RFC 9110 section 10.2.3): delay-seconds or an HTTP-date; None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now_dt = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc)
    return max(0.0, (when - now_dt).total_seconds())


def is_disallowed(headers: Any, token: str | None, directives: Iterable[str] | None) -> bool:
    """An ``X-Robots-Tag`` directive for all robots, or for ``token:``, is among ``directives``."""
    if not directives:
        return False
    wanted = set(directives)
    for value in headers.get_all("X-Robots-Tag") or []:
        head, sep, rest = value.partition(":")
        agent = head.strip().lower() if sep and " " not in head.strip() and "," not in head else None
        body = rest if agent is not None else value
        if agent is not None and agent != token:
            continue
        if any(d.strip().lower() in wanted for d in body.split(",")):
            return True
    return False


def tdm_reserved(headers: Any) -> bool:
    """TDM-Rep's ``tdm-reservation: 1`` response header (any other value reserves nothing)."""
    return any(v.strip() == "1" for v in headers.get_all("tdm-reservation") or [])


class _Fail(Exception):
    def __init__(self, reason: str, text: str, retry_after: float | None = None) -> None:
        super().__init__(text)
        self.reason, self.text, self.retry_after = reason, text, retry_after


@dataclass
class FetchSettings:
    user_agent: str
    token: str | None
    directives: frozenset[str] | None
    timeout: float
    deadline: float
    retries: int
    backoff_s: float
    max_retry_after_s: float
    host_wait_s: float
    host_interval_s: float  # the proxy's per-host spacing: the wait when it names none
    host_queue_s: float  # the longest the proxy holds a connection back for its host

    @classmethod
    def from_config(cls, c: Any) -> "FetchSettings":
        from data_pipeline.optout import user_agent_string

        token = (c.user_agent_token or c.user_agent).strip().lower()
        directives = frozenset(d.strip().lower() for d in c.disallowed_header_directives) or None
        return cls(user_agent_string(c.user_agent, c.contact_url), token, directives, float(c.timeout),
                   float(c.download_deadline), int(c.retries), float(c.backoff_s), float(c.max_retry_after_s),
                   float(c.host_wait_s), 1.0 / c.host_rate if c.host_rate > 0 else 0.1,
                   queue_seconds(float(c.timeout)))


class Fetcher:
    """``download_image_with_retry``'s replacement: ``(key, url) -> (key, BytesIO | None, error | None)``."""

    def __init__(self, settings: FetchSettings, shard_deadline_at: float | None = None) -> None:
        self.s = settings
        self.shard_deadline_at = shard_deadline_at  # time.monotonic() value, or None
        self.opener = urllib.request.build_opener()  # proxies from the environment

    def __call__(self, row: tuple[Any, str], *_: Any, **__: Any) -> tuple[Any, io.BytesIO | None, str | None]:
        key, url = row
        try:
            return key, io.BytesIO(self._with_retries(url)), None
        except _Fail as f:
            return key, None, tagged(f.reason, f.text)
        except Exception as e:  # noqa: BLE001 - one URL's surprise must not end the shard
            return key, None, tagged(DOWNLOAD_ERROR, f"{type(e).__name__}: {e}")

    def _left(self) -> float:
        return float("inf") if self.shard_deadline_at is None else self.shard_deadline_at - time.monotonic()

    def _with_retries(self, url: str) -> bytes:
        attempt, busy_since = 0, None
        while True:
            if self._left() <= 0:
                raise _Fail(SHARD_DEADLINE, "the crawl shard's deadline passed before this download started")
            try:
                return self._once(url)
            except _Fail as f:
                if f.reason == HOST_BUSY:
                    # Ask again after about one host interval (the proxy's Retry-After is whole
                    # seconds, and a tunnel's refusal shows no headers); jitter spreads the threads.
                    pause = max(0.02, self.s.host_interval_s) * random.uniform(0.5, 1.5)
                    now = time.monotonic()
                    busy_since = now if busy_since is None else busy_since  # the proxy's queue time counts too
                    if now - busy_since + pause > self.s.host_wait_s or pause > self._left():
                        raise _Fail(HOST_BUSY, f"no slot for this host within crawl.host_wait_s: {f.text}") from None
                    time.sleep(pause)
                    continue
                if f.reason not in RETRY_NOW or attempt >= self.s.retries:
                    raise
                if f.retry_after is not None:
                    if f.retry_after > self.s.max_retry_after_s:
                        raise _Fail(f.reason, f"{f.text} (Retry-After {f.retry_after:.0f} s is over "
                                              f"crawl.max_retry_after_s)") from None
                    pause = f.retry_after
                else:
                    pause = random.uniform(0, self.s.backoff_s * 2 ** attempt)
                if pause > self._left():
                    raise
                attempt += 1
                time.sleep(pause)

    def _once(self, url: str) -> bytes:
        t0 = time.monotonic()
        # The proxy starts its deadline once the host's slot is free (after at most
        # host_queue_s): a socket timeout past both lets the proxy's own answer at the
        # deadline (504 safety/deadline, or the cut) be what this client sees.
        timeout = max(0.05, min(self.s.timeout, self.s.deadline + self.s.host_queue_s + 1.0))
        backstop = self.s.deadline + self.s.host_queue_s + self.s.timeout
        req = urllib.request.Request(url, headers={"User-Agent": self.s.user_agent})
        try:
            with self.opener.open(req, timeout=timeout) as r:
                if is_disallowed(r.headers, self.s.token, self.s.directives):
                    raise _Fail(OPT_OUT_HEADER, "Use of image disallowed by X-Robots-Tag directive")
                if tdm_reserved(r.headers):
                    raise _Fail(TDM_RESERVATION_HEADER, "Use of image reserved by a tdm-reservation: 1 header")
                chunks = []
                while True:
                    if time.monotonic() - t0 > backstop:  # the proxy's cut normally comes first
                        raise _Fail(DOWNLOAD_DEADLINE, f"body still arriving after {backstop:g} s")
                    chunk = r.read(_CHUNK)
                    if not chunk:
                        break
                    chunks.append(chunk)
                if r.length:  # http.client counts down a declared Content-Length
                    raise http.client.IncompleteRead(b"".join(chunks), r.length)
                return b"".join(chunks)
        except _Fail:
            raise
        except urllib.error.HTTPError as e:
            raise self._http_failure(e) from None
        except (http.client.IncompleteRead, ConnectionError, socket.timeout, TimeoutError, urllib.error.URLError,
                http.client.HTTPException, OSError) as e:
            raise self._network_failure(e, time.monotonic() - t0) from None

    def _http_failure(self, e: urllib.error.HTTPError) -> _Fail:
        text = f"HTTP Error {e.code}: {e.reason}"
        if isinstance(e.reason, str) and e.reason in EGRESS_REASONS | {HOST_BUSY}:
            # The proxy's own answer (it replaces any origin phrase, so this is not the server's word).
            return _Fail(e.reason, text, retry_after_seconds(e.headers.get("Retry-After")))
        reason = TRANSIENT_STATUS.get(e.code, HTTP_ERROR)
        return _Fail(reason, text, retry_after_seconds(e.headers.get("Retry-After")) if reason != HTTP_ERROR else None)

    def _network_failure(self, e: BaseException, elapsed: float) -> _Fail:
        text = f"{type(e).__name__}: {e}"
        m = _PROXY_TUNNEL.search(str(e))
        if m and m.group(1) in EGRESS_REASONS | {HOST_BUSY}:
            return _Fail(m.group(1), text)
        if elapsed >= self.s.deadline:
            # The proxy cuts a connection at its deadline (counted from its host slot, so at
            # least that long after this request went out); no other cut comes so late.
            return _Fail(DOWNLOAD_DEADLINE, text)
        if isinstance(e, http.client.IncompleteRead):
            return _Fail(TRUNCATED, text)
        reason = getattr(e, "reason", None)
        if isinstance(e, (socket.timeout, TimeoutError)) or isinstance(reason, (socket.timeout, TimeoutError)) \
                or "timed out" in str(e).lower():
            return _Fail(TIMEOUT, text)
        return _Fail(CONNECTION, text)
