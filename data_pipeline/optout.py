"""Per-host opt-outs checked before the crawl: robots.txt (RFC 9309) and TDM-Rep.

The crawl's workers fetch through the egress proxy, which cannot see paths inside https
tunnels; so the per-host files are fetched here, in the prepare step, once per origin
(scheme, host, port) and cached in memory for the prepare run, and every URL of that
origin is judged against them before it is handed to img2dataset. Each fetch goes through
an :class:`~data_pipeline.egress.EgressProxy` with the crawl's address policy (a robots.txt
on, or redirected to, a private address is never fetched) and its own deadline.

- ``/robots.txt`` parsed with protego, matched for ``crawl.user_agent``. 200: its rules;
  any other 4xx: no rules (allowed, RFC 9309 2.3.1.3); 5xx, network errors, the deadline
  or an egress refusal: unreachable, judged by ``crawl.robots_unreachable`` (``allow``, the
  default, or ``deny``, strict RFC 9309 2.3.1.4) and counted as ``optout/robots_unreachable`` when denied.
  A disallowed URL counts as ``optout/robots_txt``.
- ``/.well-known/tdmrep.json`` (W3C TDM Reservation Protocol, section 3.2): a JSON array
  of ``{"location": PATTERN, "tdm-reservation": 0|1}``; the pattern uses robots.txt
  syntax (path prefix, ``*``, a final ``$``), the longest matching location decides. A
  reserved URL counts as ``optout/tdmrep``. A missing, unreachable or malformed file
  reserves nothing (the response header is the other half of the protocol).

    checker = OptOutChecker(cfg.crawl, policy, resolver)
    with checker:
        reason = checker.check("https://example.com/a.jpg")   # None or "optout/..."
"""
from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from protego import Protego

from data_pipeline.egress import REASONS, EgressProxy
from data_pipeline.safety import AddressPolicy, Resolver, resolve_host

ROBOTS_TXT = "optout/robots_txt"
ROBOTS_UNREACHABLE = "optout/robots_unreachable"
TDMREP = "optout/tdmrep"
MAX_FILE_BYTES = 512 * 1024  # RFC 9309 2.5: parse at least 500 KiB; more is ignored


def user_agent_string(token: str, contact_url: str | None) -> str:
    return f"{token}/1.0" + (f" (+{contact_url})" if contact_url else "")


def _pattern(location: str) -> re.Pattern[str]:
    anchored = location.endswith("$")
    body = location[:-1] if anchored else location
    return re.compile("".join(".*" if ch == "*" else re.escape(ch) for ch in body) + ("$" if anchored else ""))


class _Origin:
    def __init__(self, robots: Protego | None, robots_unreachable: bool, tdm: list[tuple[int, re.Pattern[str], bool]]):
        self.robots, self.robots_unreachable, self.tdm = robots, robots_unreachable, tdm


class OptOutChecker:
    def __init__(self, crawl_cfg: Any, policy: AddressPolicy, resolver: Resolver = resolve_host) -> None:
        c = crawl_cfg
        self.token = c.user_agent
        self.ua = user_agent_string(c.user_agent, c.contact_url)
        self.robots_on, self.tdm_on = c.robots_txt, c.tdmrep
        self.deny_unreachable = c.robots_unreachable == "deny"
        self.deadline = c.robots_deadline
        self.proxy = EgressProxy(policy, resolver=resolver, max_body_bytes=MAX_FILE_BYTES * 2,
                                 deadline=c.robots_deadline)
        self.cache: dict[tuple[str, str, int], _Origin] = {}
        self.threads = max(1, c.thread_count)
        self._opener: urllib.request.OpenerDirector | None = None

    @property
    def enabled(self) -> bool:
        return self.robots_on or self.tdm_on

    def __enter__(self) -> "OptOutChecker":
        if self.enabled:
            self.proxy.start()
            url = self.proxy.url()
            self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": url, "https": url}))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._opener is not None:
            self.proxy.stop()

    def _get(self, base: str, path: str) -> tuple[int | None, bytes]:
        """(status, body); status None when unreachable (network, deadline, egress refusal)."""
        assert self._opener is not None
        req = urllib.request.Request(base + path, headers={"User-Agent": self.ua})
        try:
            with self._opener.open(req, timeout=self.deadline) as r:
                return r.status, r.read(MAX_FILE_BYTES)
        except urllib.error.HTTPError as e:
            if e.reason in REASONS:  # the egress proxy refused: nothing came from the origin
                return None, b""
            return e.code, b""
        except (OSError, ValueError):  # URLError, timeouts, resets, truncated bodies
            return None, b""

    def _load(self, scheme: str, host: str, port: int) -> _Origin:
        base = f"{scheme}://{host if ':' not in host else '[' + host + ']'}:{port}"
        robots, unreachable = None, False
        if self.robots_on:
            status, body = self._get(base, "/robots.txt")
            if status is None or status >= 500:
                unreachable = True
            elif status == 200:
                robots = Protego.parse(body.decode("utf-8", "replace"))
        tdm: list[tuple[int, re.Pattern[str], bool]] = []
        if self.tdm_on:
            status, body = self._get(base, "/.well-known/tdmrep.json")
            if status == 200:
                try:
                    rules = json.loads(body)
                except ValueError:
                    rules = []
                for r in rules if isinstance(rules, list) else []:
                    loc = r.get("location") if isinstance(r, dict) else None
                    if isinstance(loc, str) and loc.startswith("/"):
                        tdm.append((len(loc), _pattern(loc), str(r.get("tdm-reservation")) == "1"))
        return _Origin(robots, unreachable, tdm)

    @staticmethod
    def _origin_key(url: str) -> tuple[str, str, int] | None:
        parts = urlsplit(url)
        scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
        try:
            return scheme, host, parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            return None  # the URL check already refused it

    def prefetch(self, urls: list[str]) -> None:
        """Load the host files of every new origin among ``urls``, ``threads`` at a time
        (one slow host then costs one deadline, not one per host in a row)."""
        if not self.enabled:
            return
        keys = sorted({k for k in map(self._origin_key, urls) if k is not None and k not in self.cache})
        if not keys:
            return
        with ThreadPoolExecutor(min(self.threads, len(keys))) as pool:
            for k, origin in zip(keys, pool.map(lambda k: self._load(*k), keys)):
                self.cache[k] = origin

    def check(self, url: str) -> str | None:
        if not self.enabled:
            return None
        key = self._origin_key(url)
        if key is None:
            return None
        parts = urlsplit(url)
        origin = self.cache.get(key)
        if origin is None:
            origin = self.cache[key] = self._load(*key)
        if origin.robots_unreachable and self.deny_unreachable:
            return ROBOTS_UNREACHABLE
        if origin.robots is not None and not origin.robots.can_fetch(url, self.token):
            return ROBOTS_TXT
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        best = max(((n, reserved) for n, pat, reserved in origin.tdm if pat.match(path)), default=None)
        if best is not None and best[1]:
            return TDMREP
        return None
