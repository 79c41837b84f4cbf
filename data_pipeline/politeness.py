"""Per-host politeness of the crawl: at most N connections to a host at once, and new
connections to it no closer together than 1 / rate seconds.

Where it is enforced: in the crawl's egress proxy (:mod:`data_pipeline.egress`), the one
place every connection of the crawl passes through, whatever the distributor: all
img2dataset processes of this machine, and the Spark/Ray executors of other machines
(they reach the proxy at ``crawl.egress_advertise``), and every redirect hop (a redirect to
a CDN counts against the CDN's host). A limit inside each crawl process could not see
the others: 64 processes with their own 1 request/s would make 64 requests/s; grouping a
host's URLs into one crawl shard would bound that, but a large host's URLs span many
shards. One limiter where all the traffic is, is exact.

The proxy holds a connection back for a short while (at most ``host_queue_s``, well
below the client's socket timeout: :func:`queue_seconds`), start slots taken in
arrival order; a connection that would wait longer is answered at once ``503
politeness/host_busy`` with ``Retry-After`` (whole seconds, rounded up, as RFC 9110 has
it) and the crawl's fetcher (:mod:`data_pipeline.fetch`) waits and asks again, for at most
``crawl.host_wait_s`` per URL, without using up a retry. Hosts are compared by name,
lower-cased, port ignored.

    limiter = HostLimiter(max_connections=4, rate=2.0)
    wait = limiter.reserve("example.com", max_wait=2.0)   # None: busy; else sleep(wait), then
    while not limiter.enter("example.com"): ...           # a connection slot; release() when done

Config keys: ``crawl.host_max_connections`` (default 8; 0: no limit), ``crawl.host_rate``
(new connections per second per host, default 4; 0: no limit).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

HOST_BUSY = "politeness/host_busy"


def queue_seconds(timeout: float) -> float:
    """How long the proxy holds a connection back for its host: well inside the client's
    socket timeout (``crawl.timeout``), which runs while it waits for the answer."""
    return min(2.0, timeout / 2)


class HostLimiter:
    """Not thread-safe: the proxy calls it from its one event-loop thread. Start slots are
    reserved in arrival order (first come, first served: a redirect hop queues behind the
    connections that came before it instead of losing to the ones that come after)."""

    def __init__(self, max_connections: int = 0, rate: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 memory: int = 100_000) -> None:
        self.max_connections = int(max_connections)
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.clock = clock
        self._active: dict[str, int] = {}
        self._next: OrderedDict[str, float] = OrderedDict()  # host -> earliest next start
        self._memory = memory

    @property
    def enabled(self) -> bool:
        return self.max_connections > 0 or self.interval > 0

    def reserve(self, host: str, max_wait: float) -> float | None:
        """Reserve ``host``'s next start slot: the seconds until it, or None (nothing
        reserved) when it is more than ``max_wait`` away."""
        host = host.lower()
        now = self.clock()
        start = max(now, self._next.get(host, now))
        if start - now > max_wait:
            return None
        self._next[host] = start + self.interval
        self._next.move_to_end(host)
        while len(self._next) > self._memory:  # forget hosts not seen for a long time
            old, t = next(iter(self._next.items()))
            if t > now or self._active.get(old):
                break
            self._next.popitem(last=False)
        return start - now

    def next_in(self, host: str) -> float:
        """Seconds until ``host``'s next free start slot (a Retry-After hint)."""
        return max(self.interval, self._next.get(host.lower(), 0.0) - self.clock())

    def enter(self, host: str) -> bool:
        """Take one of ``host``'s connection slots, if one is free."""
        host = host.lower()
        n = self._active.get(host, 0)
        if self.max_connections > 0 and n >= self.max_connections:
            return False
        self._active[host] = n + 1
        return True

    def release(self, host: str) -> None:
        host = host.lower()
        n = self._active.get(host, 0) - 1
        if n > 0:
            self._active[host] = n
        else:
            self._active.pop(host, None)
