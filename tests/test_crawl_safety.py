"""The crawl's SSRF guard (data_pipeline.safety) and its use before crawling.

Run: .venv/bin/python -m pytest -q tests/test_crawl_safety.py
"""
from __future__ import annotations

import pandas as pd
import pytest

from data_pipeline.safety import BAD_SCHEME, BAD_URL, PRIVATE_ADDRESS, UrlGuard, is_public_address, resolve_host


def fake_resolver(table: dict[str, list[str]]):
    return lambda host, port: table.get(host, [])


@pytest.mark.parametrize("url,expected", [
    ("http://10.1.2.3/a.jpg", PRIVATE_ADDRESS),
    ("http://172.16.0.9/a.jpg", PRIVATE_ADDRESS),
    ("http://192.168.0.5/a.jpg", PRIVATE_ADDRESS),
    ("http://127.0.0.1:8000/a.jpg", PRIVATE_ADDRESS),
    ("http://[::1]/a.jpg", PRIVATE_ADDRESS),
    ("http://169.254.169.254/latest/meta-data", PRIVATE_ADDRESS),  # cloud metadata
    ("http://0.0.0.0/", PRIVATE_ADDRESS),
    ("http://224.0.0.1/", PRIVATE_ADDRESS),  # multicast
    ("http://100.64.0.1/", PRIVATE_ADDRESS),  # carrier-grade NAT
    ("http://[::ffff:10.0.0.1]/", PRIVATE_ADDRESS),  # IPv4-mapped IPv6
    ("http://[fe80::1]/", PRIVATE_ADDRESS),
    ("http://8.8.8.8/a.jpg", None),
    ("https://[2606:4700::1111]/a.jpg", None),
    ("file:///etc/passwd", BAD_SCHEME),
    ("ftp://example.com/a.jpg", BAD_SCHEME),
    ("gopher://example.com/", BAD_SCHEME),
    ("http:///no-host", BAD_URL),
    ("http://example.com:notaport/", BAD_URL),
    ("", BAD_URL),
])
def test_literal_addresses_and_schemes(url: str, expected: str | None) -> None:
    assert UrlGuard(resolver=fake_resolver({})).check(url) == expected


def test_hostnames_are_judged_by_what_they_resolve_to() -> None:
    guard = UrlGuard(resolver=fake_resolver({
        "public.example": ["93.184.216.34"],
        "intranet.example": ["10.0.0.7"],
        "mixed.example": ["93.184.216.34", "192.168.1.1"],  # one private answer is enough
    }))
    assert guard.check_many([
        "http://public.example/a.jpg", "http://intranet.example/a.jpg",
        "http://mixed.example/a.jpg", "http://unresolvable.example/a.jpg",
    ]) == [None, PRIVATE_ADDRESS, PRIVATE_ADDRESS, None]


def test_real_resolution_of_localhost() -> None:
    assert any(not is_public_address(__import__("ipaddress").ip_address(a)) for a in resolve_host("localhost", 80))
    assert UrlGuard().check("http://localhost:9/x.jpg") == PRIVATE_ADDRESS
    # decimal form of 127.0.0.1 resolves (inet_aton) to loopback too
    assert UrlGuard().check("http://2130706433/x.jpg") == PRIVATE_ADDRESS


def test_allow_private_and_allowed_networks() -> None:
    urls = ["http://127.0.0.1:1/a", "http://localhost:1/a", "http://10.0.0.1/a", "file:///x"]
    assert UrlGuard(allow_private=True).check_many(urls) == [None, None, None, BAD_SCHEME]
    only_loopback = UrlGuard(allowed_networks=["127.0.0.1/32", "::1/128"])
    assert only_loopback.check_many(urls) == [None, None, PRIVATE_ADDRESS, BAD_SCHEME]


def test_resolves_each_host_once() -> None:
    calls: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["93.184.216.34"]

    guard = UrlGuard(resolver=resolver)
    guard.check_many([f"http://cdn.example/{i}.jpg" for i in range(50)])
    guard.check_many(["http://cdn.example/again.jpg"])
    assert calls == ["cdn.example"]


def test_prepare_refuses_and_counts_without_crawling(tmp_path) -> None:
    """A run without --allow-private-addresses: private URLs never reach img2dataset's input."""
    from data_pipeline.config import load_config
    from data_pipeline.layout import Layout
    from data_pipeline.prepare import prepare_inputs

    urls = ["http://8.8.8.8/ok.jpg", "http://10.0.0.1/a.jpg", "http://192.168.1.20/b.jpg",
            "http://127.0.0.1:8080/c.jpg", "file:///etc/shadow", "", "http://1.1.1.1/ok2.jpg"]
    pd.DataFrame({"url": urls, "caption": [f"caption number {i}" for i in range(len(urls))]}).to_parquet(
        tmp_path / "urls.parquet")
    cfg = load_config(None, [("urls", str(tmp_path / "urls.parquet")), ("output", str(tmp_path / "out"))])
    summary = prepare_inputs(cfg, Layout(cfg.output))
    assert summary.rows == 7 and summary.passed == [2]
    assert summary.counts == {"safety/private_address": 3, "safety/bad_scheme": 1, "input/missing_url": 1}
    handed = pd.read_parquet(summary.files[0])
    assert handed["url"].tolist() == ["http://8.8.8.8/ok.jpg", "http://1.1.1.1/ok2.jpg"]
    assert handed["input_row"].tolist() == [0, 6]
    # the same list with the flag: only the bad scheme and the empty URL are refused
    cfg2 = load_config(None, [("urls", str(tmp_path / "urls.parquet")), ("output", str(tmp_path / "out2")),
                              ("crawl.allow_private_addresses", True)])
    s2 = prepare_inputs(cfg2, Layout(cfg2.output))
    assert s2.passed == [5] and s2.counts == {"safety/bad_scheme": 1, "input/missing_url": 1}
