"""Refuse URLs that point at this machine or a private network (SSRF guard for the crawl).

A crawl fetches whatever a URL list says; a list from the web can name
``http://169.254.169.254/`` (cloud metadata), ``http://localhost:8080/admin`` or
``file:///etc/passwd``. One :class:`AddressPolicy` (private ranges + the allow-list)
decides which addresses the crawl may reach; it is applied twice:

- before img2dataset sees a URL, by :class:`UrlGuard` (a cheap pre-filter of the list);
- at connect time, for every connection and redirect hop, by the crawl's egress proxy
  (:mod:`data_pipeline.egress`), which resolves names itself and connects to the exact
  address it checked.

:class:`UrlGuard` refuses:

- schemes other than http/https  -> ``safety/bad_scheme``
- no host / unparsable URL         -> ``safety/bad_url``
- a host that is, or resolves to, an address that is not globally routable (loopback,
  private, link-local, shared, reserved, multicast, unspecified; IPv4-mapped IPv6 too)
  -> ``safety/private_address``

Resolution uses ``socket.getaddrinfo`` once per (host, port), in a thread pool. A host
that does not resolve passes here (DNS may be down for a moment while a list is
prepared); the egress proxy refuses it at connect time (``safety/unresolvable``). DNS can
also answer differently at crawl time (rebinding): that is why the proxy checks again.

    policy = AddressPolicy(allow_private=False, allowed_networks=["127.0.0.1/32"])
    guard = UrlGuard(policy=policy)
    reasons = guard.check_many(urls)   # list of None (allowed) or "safety/..." per URL
    policy.refusal(["10.0.0.7"])       # "safety/private_address" (None: all allowed)
"""
from __future__ import annotations

import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Sequence
from urllib.parse import urlsplit

BAD_SCHEME = "safety/bad_scheme"
BAD_URL = "safety/bad_url"
PRIVATE_ADDRESS = "safety/private_address"
UNRESOLVABLE = "safety/unresolvable"
ALLOWED_SCHEMES = ("http", "https")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]


def is_public_address(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return bool(ip.is_global) and not (
        ip.is_multicast or ip.is_loopback or ip.is_link_local or ip.is_private
        or ip.is_reserved or ip.is_unspecified
    )


def resolve_host(host: str, port: int) -> list[str]:
    """All addresses ``host`` resolves to ([] when it does not resolve)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        return []
    return sorted({info[4][0].split("%", 1)[0] for info in infos})


def split_host(url: str) -> tuple[str | None, str | None, int]:
    """(reason or None, host, port) of an http(s) URL."""
    try:
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            return BAD_SCHEME, None, 0
        host = parts.hostname
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:  # e.g. a port that is not a number, a bad IPv6 literal
        return BAD_URL, None, 0
    if not host:
        return BAD_URL, None, 0
    return None, host, port


def literal_address(host: str) -> IPAddress | None:
    """The address when ``host`` is an IP literal (``[::1]`` brackets allowed), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class AddressPolicy:
    """Which addresses the crawl may connect to: globally routable ones, plus
    ``allowed_networks`` (or everything when ``allow_private``)."""

    def __init__(self, allow_private: bool = False, allowed_networks: Sequence[str] = ()) -> None:
        self.allow_private = allow_private
        self.allowed_networks = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]

    def address_allowed(self, ip: IPAddress) -> bool:
        if self.allow_private or is_public_address(ip):
            return True
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == n.version and ip in n for n in self.allowed_networks)

    def refusal(self, addresses: Iterable[str]) -> str | None:
        """None when every address is allowed; one refused answer refuses the host."""
        for addr in addresses:
            try:
                ip = ipaddress.ip_address(addr)
            except ValueError:
                return PRIVATE_ADDRESS  # not an address we can judge: never connect to it
            if not self.address_allowed(ip):
                return PRIVATE_ADDRESS
        return None


class UrlGuard:
    """Decides per URL whether the crawl may fetch it (see module docstring)."""

    def __init__(
        self,
        allow_private: bool = False,
        allowed_networks: Sequence[str] = (),
        resolver: Resolver = resolve_host,
        threads: int = 32,
        policy: AddressPolicy | None = None,
    ) -> None:
        self.policy = policy if policy is not None else AddressPolicy(allow_private, allowed_networks)
        self.resolver = resolver
        self.threads = threads
        self._cache: dict[tuple[str, int], str | None] = {}

    def _host_reason(self, host: str, port: int) -> str | None:
        literal = literal_address(host)
        if literal is not None:
            return None if self.policy.address_allowed(literal) else PRIVATE_ADDRESS
        if self.policy.allow_private:
            return None  # nothing to refuse: skip the DNS round trip
        return self.policy.refusal(self.resolver(host, port))  # [] (no answer) passes here

    def check_many(self, urls: Iterable[str | None], progress: Callable[[int], None] | None = None) -> list[str | None]:
        """One reason (or None = allowed) per URL; hosts are resolved once, in parallel."""
        parsed = [split_host(u) if u else (BAD_URL, None, 0) for u in urls]
        todo = sorted({(h, p) for r, h, p in parsed if r is None and h is not None} - set(self._cache))
        if todo:
            with ThreadPoolExecutor(max(1, min(self.threads, len(todo)))) as pool:
                for hp, reason in zip(todo, pool.map(lambda hp: self._host_reason(*hp), todo)):
                    self._cache[hp] = reason
                    if progress is not None:
                        progress(1)
        return [r if r is not None else self._cache[(h, p)] for r, h, p in parsed]  # type: ignore[index]

    def check(self, url: str) -> str | None:
        return self.check_many([url])[0]
