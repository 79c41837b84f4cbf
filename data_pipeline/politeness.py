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

The proxy does not hold a connection back while the host is busy (the client's socket
timeout would fire); it answers at once ``503 politeness/host_busy`` with
``Retry-After`` (whole seconds, rounded up, as RFC 9110 has it) and the crawl's fetcher
(:mod:`data_pipeline.fetch`) waits and asks again, for at most ``crawl.host_wait_s`` per
URL, without using up a retry. Hosts are compared by name, lower-cased, port ignored.

    limiter = HostLimiter(max_connections=4, rate=2.0)
    wait = limiter.acquire("example.com")   # None: go (release() when done), else seconds to wait

Config keys: ``crawl.host_max_connections`` (default 8; 0: no limit), ``crawl.host_rate``
(new connections per second per host, default 4; 0: no limit).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

HOST_BUSY = "politeness/host_busy"


class HostLimiter:
    """Not thread-safe: the proxy calls it from its one event-loop thread."""

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

    def acquire(self, host: str) -> float | None:
        """None and the slot taken, or the seconds until one may be free."""
        if not self.enabled:
            return None
        host = host.lower()
        now = self.clock()
        start = self._next.get(host, now)
        if start > now:
            return start - now
        if self.max_connections > 0 and self._active.get(host, 0) >= self.max_connections:
            return max(self.interval, 0.1)  # when one finishes is unknown: ask again soon
        self._active[host] = self._active.get(host, 0) + 1
        self._next[host] = now + self.interval
        self._next.move_to_end(host)
        while len(self._next) > self._memory:  # forget hosts not seen for a long time
            old, t = next(iter(self._next.items()))
            if t > now or self._active.get(old):
                break
            self._next.popitem(last=False)
        return None

    def release(self, host: str) -> None:
        host = host.lower()
        n = self._active.get(host, 0) - 1
        if n > 0:
            self._active[host] = n
        else:
            self._active.pop(host, None)
