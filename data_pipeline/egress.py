"""The crawl's egress proxy: the address policy enforced at connect time, for every connection.

img2dataset fetches with urllib, which follows up to 10 redirects (http, https and ftp)
without asking anyone, resolves names again when it connects, reads bodies whole and
times out per socket operation only. The crawl therefore starts this proxy for the
duration of ``img2dataset.download`` and points every worker at it (``http_proxy``,
``https_proxy``, ``ftp_proxy``; ``no_proxy`` cleared), the approach of Stripe's
Smokescreen. For every connection (a plain-HTTP ``GET``/``HEAD`` with an absolute URI,
or a ``CONNECT`` tunnel for https) it:

- refuses schemes other than http/https (an ``ftp://`` redirect arrives as a proxy
  request) -> ``safety/bad_scheme``; other methods or malformed requests ->
  ``safety/bad_request``;
- resolves the host itself and refuses it when any answer is not allowed by the crawl's
  :class:`~data_pipeline.safety.AddressPolicy` (the same object the URL list is checked
  with) -> ``safety/private_address``; a name with no answer -> ``safety/unresolvable``;
- connects to the exact address it checked (DNS rebinding between check and connect is
  impossible);
- plain HTTP only: a ``3xx`` whose ``Location`` is not http/https is answered
  ``safety/redirect_bad_scheme`` instead of being passed on; an http(s) ``Location`` is
  remembered (scheme, host, port; a bounded recent map) and a later refusal of that
  target counts as ``safety/redirect_to_private``. The origin's reason phrase is replaced
  by the standard one, so only this proxy can put a ``safety/...`` reason into the
  crawl's error messages;
- caps the response body at ``max_body_bytes`` -> ``safety/body_too_large`` (refused up
  front when a plain-HTTP ``Content-Length`` says so; otherwise the connection is cut
  once that many bytes came from the origin, tunnels included: the bytes then count TLS
  records);
- gives the connection ``deadline`` seconds in all -> ``safety/deadline`` (urllib sends
  ``Connection: close``: one connection is one download, or one redirect hop), counted
  from when it may go out (after the politeness queue below);
- admits at most ``host_max_connections`` connections per host at once and new ones at
  most ``host_rate`` per second per host (:mod:`data_pipeline.politeness`: why here),
  holding a connection back for at most ``host_queue_s``; past that it answers ``503
  politeness/host_busy`` with ``Retry-After``, and the crawl's fetcher asks again later.

A refusal before any response byte is an HTTP answer whose reason phrase is the counted
reason (``HTTP/1.1 403 safety/private_address``): img2dataset records it as the sample's
``error_message`` (``HTTP Error 403: safety/private_address``, or ``Tunnel connection
failed: 403 safety/...`` for https) and :mod:`data_pipeline.crawl_counts` counts it. A
cut after the response started closes the connection without completing the framing
(the client sees a truncated body, never a short success). The proxy also counts every
refusal, cut and failed connection itself, by reason (:meth:`EgressProxy.counts`); the
crawl saves those counts next to the crawl shards and the stats stage reports them.

    policy = AddressPolicy(allow_private=False, allowed_networks=["127.0.0.1/32"])
    with EgressProxy(policy, max_body_bytes=32 << 20, deadline=60.0) as proxy:
        os.environ.update(proxy.worker_env())      # or a Spark/Ray worker environment
        ...                                        # urllib.request.urlopen(...) goes through it
    proxy.counts()                                 # {"connections": 12, "safety/private_address": 1, ...}

The proxy runs on its own asyncio event loop in a daemon thread of the crawl process,
bound to ``127.0.0.1`` on a free port by default. Workers on other machines (a Spark or
Ray cluster) need it bound to an address they can reach (``crawl.egress_bind`` and
``crawl.egress_advertise``, see :mod:`data_pipeline.crawl`).
"""
from __future__ import annotations

import asyncio
import http
import math
import threading
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urljoin, urlsplit

import h11

from data_pipeline import politeness
from data_pipeline.safety import (
    ALLOWED_SCHEMES, BAD_SCHEME, PRIVATE_ADDRESS, UNRESOLVABLE, AddressPolicy, Resolver, literal_address,
    resolve_host,
)

BAD_REQUEST = "safety/bad_request"
REDIRECT_TO_PRIVATE = "safety/redirect_to_private"
REDIRECT_BAD_SCHEME = "safety/redirect_bad_scheme"
BODY_TOO_LARGE = "safety/body_too_large"
DEADLINE = "safety/deadline"
CONNECTION_ERROR = "download/connection_error"
BAD_RESPONSE = "download/bad_response"
HOST_BUSY = politeness.HOST_BUSY
# Every reason this proxy can put into a response (crawl_counts trusts only these).
REASONS = frozenset({BAD_SCHEME, PRIVATE_ADDRESS, UNRESOLVABLE, BAD_REQUEST, REDIRECT_TO_PRIVATE,
                     REDIRECT_BAD_SCHEME, BODY_TOO_LARGE, DEADLINE, CONNECTION_ERROR, BAD_RESPONSE, HOST_BUSY})
PROXY_ENV_VARS = ("http_proxy", "https_proxy", "ftp_proxy", "HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY")
NO_PROXY_ENV_VARS = ("no_proxy", "NO_PROXY")

# Hop-by-hop headers (RFC 9110 section 7.6.1) and the proxy's own: never forwarded.
_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization",
                  b"proxy-authenticate", b"te", b"trailer", b"transfer-encoding", b"upgrade"})
_CHUNK = 64 * 1024


class _Stop(Exception):
    """End this connection: refused (nothing answered yet) or cut (the answer had started)."""

    def __init__(self, reason: str, status: int = 403, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.status, self.retry_after = reason, status, retry_after


class _Conn:
    """One client connection's state, for the error path."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.upstream: asyncio.StreamWriter | None = None
        self.started = False  # a response (or the tunnel's 200) went to the client
        self.host_slot: str | None = None  # the host whose politeness slot this connection holds
        self.expired = False
        self._timer: asyncio.TimerHandle | None = None

    def arm(self, seconds: float, task: asyncio.Task[Any]) -> None:
        """(Re)start the connection's deadline: when it passes, the task is cancelled."""
        self.disarm()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expire, task)

    def _expire(self, task: asyncio.Task[Any]) -> None:
        self.expired = True
        task.cancel()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class EgressProxy:
    """HTTP/CONNECT proxy enforcing ``policy`` per connection (see module docstring)."""

    def __init__(
        self,
        policy: AddressPolicy,
        *,
        resolver: Resolver = resolve_host,
        max_body_bytes: int = 32 << 20,
        deadline: float = 60.0,
        host: str = "127.0.0.1",
        port: int = 0,
        redirect_memory: int = 4096,
        resolver_threads: int = 64,
        host_max_connections: int = 0,
        host_rate: float = 0.0,
        host_queue_s: float = 2.0,
    ) -> None:
        self.policy, self.resolver = policy, resolver
        self.max_body_bytes, self.deadline = int(max_body_bytes), float(deadline)
        self.host, self.port = host, port
        self._redirect_memory = redirect_memory
        self._redirects: OrderedDict[tuple[str, str, int], None] = OrderedDict()
        self._counts: Counter[str] = Counter()
        self.hosts = politeness.HostLimiter(host_max_connections, host_rate)
        self.host_queue_s = float(host_queue_s)
        self._lock = threading.Lock()
        self._resolver_pool = ThreadPoolExecutor(resolver_threads, thread_name_prefix="egress-dns")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---- life cycle -------------------------------------------------------------------
    def start(self) -> "EgressProxy":
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="egress-proxy", daemon=True)
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, self.host, self.port, backlog=1024, limit=_CHUNK), loop)
        try:
            self._server = fut.result(timeout=30)
        except BaseException:
            self.stop()
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=30)
        loop.close()
        self._resolver_pool.shutdown(wait=False, cancel_futures=True)
        self._loop = self._thread = self._server = None

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def __enter__(self) -> "EgressProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def url(self, advertise: str | None = None) -> str:
        host = advertise or self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def worker_env(self, advertise: str | None = None) -> dict[str, str]:
        """Environment that sends urllib (http, https, ftp) through this proxy, no exceptions."""
        url = self.url(advertise)
        return {**{k: url for k in PROXY_ENV_VARS}, **{k: "" for k in NO_PROXY_ENV_VARS}}

    def counts(self) -> dict[str, int]:
        """Connections, and refusals / cuts / failures by reason, so far."""
        with self._lock:
            return dict(sorted(self._counts.items()))

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    # ---- one connection ---------------------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = _Conn(writer)
        self._count("connections")
        conn.arm(self.deadline + self.host_queue_s, task)  # restarted once the host slot is taken
        try:
            await self._serve(conn, reader)
        except _Stop as stop:
            self._finish(conn, stop.reason, stop.status, stop.retry_after)
        except asyncio.CancelledError:
            if conn.expired:
                self._finish(conn, DEADLINE, 504)
            # else: the proxy is stopping
        except h11.ProtocolError:
            # From the origin's side (the client's request was parsed before we connected).
            self._finish(conn, BAD_RESPONSE, 502)
        except (OSError, asyncio.IncompleteReadError):
            self._count("aborted")  # either side hung up mid-way
        finally:
            conn.disarm()
            for w in (conn.upstream, writer):
                if w is not None:
                    w.close()
            if conn.host_slot is not None:
                self.hosts.release(conn.host_slot)
            self._tasks.discard(task)

    def _finish(self, conn: _Conn, reason: str, status: int, retry_after: float | None = None) -> None:
        self._count(reason)
        if conn.started:
            return  # cut: closing without the rest of the framing is the signal
        phrase = reason.encode("ascii")
        extra = b"" if retry_after is None else b"Retry-After: %d\r\n" % max(1, math.ceil(retry_after))
        try:
            conn.writer.write(b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\n%sConnection: close\r\n\r\n"
                              % (status, phrase, extra))
        except (OSError, RuntimeError):
            pass

    async def _serve(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        try:
            req = await _next_event(h, reader)
        except h11.ProtocolError as e:
            raise _Stop(BAD_REQUEST, 400) from e
        if isinstance(req, h11.ConnectionClosed):
            return
        if not isinstance(req, h11.Request):
            raise _Stop(BAD_REQUEST, 400)
        if req.method == b"CONNECT":
            self._count("tunnels")
            await self._tunnel(conn, h, req, reader)
        elif req.method in (b"GET", b"HEAD"):
            self._count("requests")
            await self._forward(conn, h, req, reader)
        else:
            raise _Stop(BAD_REQUEST, 405)

    async def _admit(self, conn: _Conn, scheme: str, host: str, port: int) -> list[str]:
        """The addresses to connect to, all checked, and the host's politeness slot taken;
        raises _Stop with the reason."""
        literal = literal_address(host)
        if literal is not None:
            addrs = [str(literal)]
        else:
            loop = asyncio.get_running_loop()
            addrs = await loop.run_in_executor(self._resolver_pool, self.resolver, host, port)
            if not addrs:
                raise _Stop(UNRESOLVABLE)
        reason = self.policy.refusal(addrs)
        if reason is not None:
            if reason == PRIVATE_ADDRESS and (scheme, host.lower(), port) in self._redirects:
                reason = REDIRECT_TO_PRIVATE
            raise _Stop(reason)
        await self._host_slot(conn, host)  # after the policy: a refused host never waits
        return addrs

    async def _host_slot(self, conn: _Conn, host: str) -> None:
        """The host's politeness slot (:mod:`data_pipeline.politeness`), waited for at most
        ``host_queue_s``; else ``politeness/host_busy``."""
        if self.hosts.enabled:
            loop = asyncio.get_running_loop()
            end = loop.time() + self.host_queue_s
            wait = self.hosts.reserve(host, self.host_queue_s)
            if wait is None:
                raise _Stop(HOST_BUSY, 503, self.hosts.next_in(host))
            if wait > 0:
                await asyncio.sleep(wait)
            while not self.hosts.enter(host):
                if loop.time() >= end:
                    raise _Stop(HOST_BUSY, 503, self.hosts.next_in(host))
                await asyncio.sleep(0.02)  # a slot frees when one of the host's connections ends
            conn.host_slot = host
        # The deadline judges the origin: it starts when the connection may go out.
        task = asyncio.current_task()
        assert task is not None
        conn.arm(self.deadline, task)

    async def _connect(self, conn: _Conn, addrs: list[str], port: int) -> asyncio.StreamReader:
        err: OSError | None = None
        for addr in addrs:  # exactly the addresses checked: no second resolution
            try:
                r, w = await asyncio.open_connection(addr, port, limit=_CHUNK)
            except OSError as e:
                err = e
                continue
            conn.upstream = w
            return r
        raise _Stop(CONNECTION_ERROR, 502) from err

    def _remember_redirect(self, scheme: str, host: str, port: int) -> None:
        key = (scheme, host.lower(), port)
        self._redirects[key] = None
        self._redirects.move_to_end(key)
        while len(self._redirects) > self._redirect_memory:
            self._redirects.popitem(last=False)

    # ---- CONNECT (https) ---------------------------------------------------------------
    async def _tunnel(self, conn: _Conn, h: h11.Connection, req: h11.Request, reader: asyncio.StreamReader) -> None:
        try:
            parts = urlsplit("//" + req.target.decode("ascii"))
            host, port = parts.hostname, parts.port
        except (UnicodeDecodeError, ValueError) as e:
            raise _Stop(BAD_REQUEST, 400) from e
        if not host or port is None:
            raise _Stop(BAD_REQUEST, 400)
        addrs = await self._admit(conn, "https", host, port)
        up_reader = await self._connect(conn, addrs, port)
        assert conn.upstream is not None
        conn.writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        conn.started = True
        leftover, _ = h.trailing_data  # bytes the client sent after the CONNECT head
        if leftover:
            conn.upstream.write(leftover)
        up = asyncio.ensure_future(_pump(reader, conn.upstream, None))
        down = asyncio.ensure_future(_pump(up_reader, conn.writer, self.max_body_bytes))
        try:
            done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()  # re-raises a cut (_Stop) or a socket error
        finally:
            for t in (up, down):
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)

    # ---- plain HTTP ----------------------------------------------------------------------
    async def _forward(self, conn: _Conn, h: h11.Connection, req: h11.Request, reader: asyncio.StreamReader) -> None:
        try:
            url = req.target.decode("ascii")
            parts = urlsplit(url)
            scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
        except (UnicodeDecodeError, ValueError) as e:
            raise _Stop(BAD_REQUEST, 400) from e
        if scheme and scheme != "http":
            raise _Stop(BAD_SCHEME)  # ftp:// (ftp_proxy), or https:// not sent as CONNECT
        if not scheme or not host:
            raise _Stop(BAD_REQUEST, 400)  # an origin-form request: not a proxy request
        port = port or 80
        addrs = await self._admit(conn, "http", host, port)
        up_reader = await self._connect(conn, addrs, port)
        assert conn.upstream is not None
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = [(k, v) for k, v in req.headers if k.lower() not in _HOP]
        if not any(k.lower() == b"host" for k, _ in headers):
            headers.append((b"host", parts.netloc.rsplit("@", 1)[-1].encode("ascii")))
        headers.append((b"connection", b"close"))
        up = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        conn.upstream.write(up.send(h11.Request(method=req.method, target=target.encode("ascii"), headers=headers)))
        conn.upstream.write(up.send(h11.EndOfMessage()))
        await conn.upstream.drain()
        resp = await _response_head(up, up_reader)
        while isinstance(resp, h11.InformationalResponse):  # 1xx: nothing the client asked for
            resp = await _next_event(up, up_reader)
        if not isinstance(resp, h11.Response):
            raise _Stop(BAD_RESPONSE, 502)
        self._check_response(url, resp)
        out = [(k, v) for k, v in resp.headers if k not in _HOP]
        out.append((b"connection", b"close"))
        try:
            phrase = http.HTTPStatus(resp.status_code).phrase.encode("ascii")
        except ValueError:
            phrase = b""
        conn.writer.write(h.send(h11.Response(status_code=resp.status_code, headers=out, reason=phrase)))
        conn.started = True
        total = 0
        while True:
            ev = await _next_event(up, up_reader)
            if isinstance(ev, h11.Data):
                total += len(ev.data)
                if total > self.max_body_bytes:
                    raise _Stop(BODY_TOO_LARGE)
                conn.writer.write(h.send(h11.Data(data=ev.data)))
                await conn.writer.drain()
            elif isinstance(ev, h11.EndOfMessage):
                conn.writer.write(h.send(h11.EndOfMessage()))
                await conn.writer.drain()
                return
            else:  # the origin closed mid-body: the client sees the truncation
                return

    def _check_response(self, url: str, resp: h11.Response) -> None:
        headers = {k: v for k, v in resp.headers}  # h11 lower-cases names
        if 300 <= resp.status_code < 400 and b"location" in headers:
            try:
                target = urlsplit(urljoin(url, headers[b"location"].decode("latin-1").strip()))
                scheme, host = target.scheme.lower(), target.hostname
                port = target.port or (443 if scheme == "https" else 80)
            except ValueError as e:
                raise _Stop(REDIRECT_BAD_SCHEME) from e
            if scheme not in ALLOWED_SCHEMES or not host:
                raise _Stop(REDIRECT_BAD_SCHEME)  # file://, ftp://, data:, ... never passed on
            self._remember_redirect(scheme, host, port)
        length = headers.get(b"content-length")
        if length is not None and int(length) > self.max_body_bytes:  # h11 checked it is a number
            raise _Stop(BODY_TOO_LARGE)


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        ev = conn.next_event()
        if ev is not h11.NEED_DATA:
            return ev
        conn.receive_data(await reader.read(_CHUNK))


async def _response_head(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    """The origin's first event; an origin that resets or closes before sending a byte
    failed to connect, in effect (the client may try again), not a malformed answer."""
    got = False
    while True:
        ev = conn.next_event()
        if ev is not h11.NEED_DATA:
            return ev
        try:
            data = await reader.read(_CHUNK)
        except ConnectionError as e:
            if got:
                raise
            raise _Stop(CONNECTION_ERROR, 502) from e
        if not data and not got:
            raise _Stop(CONNECTION_ERROR, 502)
        got = True
        conn.receive_data(data)


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, limit: int | None) -> None:
    total = 0
    while True:
        data = await src.read(_CHUNK)
        if not data:
            return
        total += len(data)
        if limit is not None and total > limit:
            raise _Stop(BODY_TOO_LARGE)
        dst.write(data)
        await dst.drain()
