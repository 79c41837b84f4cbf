"""The crawl's fetcher (data_pipeline.fetch) through a real egress proxy against a real
loopback server that counts requests per path: transient failures retried with backoff
and Retry-After, permanent ones never; the opt-out headers; the per-download and shard
deadlines; the per-host limits of the proxy (data_pipeline.politeness).

Run: .venv/bin/python -m pytest -q tests/test_crawl_fetch.py   (~15 s)
"""
from __future__ import annotations

import email.utils
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import pytest

from data_pipeline.config import load_config
from data_pipeline.egress import EgressProxy
from data_pipeline.fetch import FetchSettings, Fetcher, retry_after_seconds, tag_of
from data_pipeline.safety import AddressPolicy
from polite_server import ScriptServer, Step

IMG = b"\xff\xd8not-really-a-jpeg-but-bytes\xff\xd9"
UA = "clip-pretrain/1.0 (+https://example.org/crawler)"


def settings(**over) -> FetchSettings:
    base = {"crawl.retries": 2, "crawl.backoff_s": 0.05, "crawl.max_retry_after_s": 3.0, "crawl.timeout": 3.0,
            "crawl.download_deadline": 1.5, "crawl.contact_url": "https://example.org/crawler"}
    base.update({f"crawl.{k}": v for k, v in over.items()})
    return FetchSettings.from_config(load_config(None, list(base.items())).crawl)


@contextmanager
def through_proxy(**limits) -> Iterator[EgressProxy]:
    saved = {k: os.environ.get(k) for k in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "NO_PROXY")}
    with EgressProxy(AddressPolicy(False, ["127.0.0.1/32"]), deadline=1.5, **limits) as px:
        os.environ.update(px.worker_env())
        try:
            yield px
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def test_retry_after_forms() -> None:
    now = time.time()
    assert retry_after_seconds("7") == 7.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28.0 <= retry_after_seconds(date, now=now) <= 30.0
    assert retry_after_seconds(email.utils.formatdate(now - 100, usegmt=True), now=now) == 0.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


@pytest.mark.timeout(60)
def test_transient_retried_permanent_never() -> None:
    soon = email.utils.formatdate(time.time() + 1, usegmt=True)
    scripts = {
        "/429.jpg": [Step(429, {"Retry-After": "1"}), Step(429, {"Retry-After": soon}), Step(body=IMG)],
        "/503.jpg": [Step(503)],  # always: 1 + 2 retries, then download/unavailable
        "/503long.jpg": [Step(503, {"Retry-After": "3600"})],  # too long to wait: fails at once
        "/reset.jpg": [Step(kind="reset"), Step(body=IMG)],
        "/404.jpg": [Step(404)], "/403.jpg": [Step(403)], "/500.jpg": [Step(500)],
        "/page.html": [Step(body=b"<html>not an image</html>", headers={"Content-Type": "text/html"})],
        "/tdm.jpg": [Step(body=IMG, headers={"tdm-reservation": "1"})],
        "/tdm0.jpg": [Step(body=IMG, headers={"tdm-reservation": "0"})],
        "/noai.jpg": [Step(body=IMG, headers={"X-Robots-Tag": "clip-pretrain: noai"})],
        "/other.jpg": [Step(body=IMG, headers={"X-Robots-Tag": "otherbot: noai, noindex"})],
    }
    expect = {  # path: (reason or None for success, requests the server saw)
        "/429.jpg": (None, 3), "/503.jpg": ("download/unavailable", 3), "/503long.jpg": ("download/unavailable", 1),
        "/reset.jpg": (None, 2), "/404.jpg": ("download/http_error", 1), "/403.jpg": ("download/http_error", 1),
        "/500.jpg": ("download/http_error", 1), "/page.html": (None, 1),
        "/tdm.jpg": ("optout/tdm_reservation_header", 1), "/tdm0.jpg": (None, 1),
        "/noai.jpg": ("download/opt_out", 1), "/other.jpg": (None, 1),
    }
    with ScriptServer(scripts) as srv, through_proxy():
        fetch = Fetcher(settings())
        t0 = time.monotonic()
        with ThreadPoolExecutor(len(scripts)) as pool:
            got = dict(zip(scripts, pool.map(lambda p: fetch((p, srv.url(p))), scripts)))
        elapsed = time.monotonic() - t0
        counts = {p: srv.count(p) for p in scripts}
        agents = srv.user_agents()
    for path, (reason, n) in expect.items():
        key, stream, err = got[path]
        assert key == path and counts[path] == n, (path, counts[path], err)
        assert tag_of(err) == reason, (path, err)
        assert (stream is not None) == (reason is None)
    assert got["/429.jpg"][1].getvalue() == IMG
    assert elapsed >= 1.0  # the first Retry-After (1 s) was waited for
    assert agents == {UA}  # every request named the project and its contact URL


@pytest.mark.timeout(60)
def test_silent_and_dripping_servers_end_at_the_deadline() -> None:
    scripts = {"/silent.jpg": [Step(kind="silent")], "/drip.jpg": [Step(kind="drip")]}
    with ScriptServer(scripts) as srv, through_proxy() as px:
        fetch = Fetcher(settings())
        t0 = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            got = dict(zip(scripts, pool.map(lambda p: fetch((p, srv.url(p))), scripts)))
        elapsed = time.monotonic() - t0
        counts = {p: srv.count(p) for p in scripts}
        proxy_counts = px.counts()
    assert tag_of(got["/silent.jpg"][2]) == "safety/deadline"  # the proxy answered 504 at its deadline
    assert tag_of(got["/drip.jpg"][2]) == "download/deadline"  # cut mid-body
    assert counts == {"/silent.jpg": 1, "/drip.jpg": 1}  # a deadline is not retried within the run
    assert proxy_counts["safety/deadline"] == 2
    assert elapsed < 5.0


@pytest.mark.timeout(30)
def test_nothing_starts_after_the_shard_deadline() -> None:
    with ScriptServer({"/a.jpg": [Step(body=IMG)]}) as srv, through_proxy():
        _, stream, err = Fetcher(settings(), shard_deadline_at=time.monotonic() - 1)(("k", srv.url("/a.jpg")))
        assert stream is None and tag_of(err) == "crawl/shard_deadline"
        assert srv.count("/a.jpg") == 0


@pytest.mark.timeout(60)
def test_redirect_hop_queues_for_its_host() -> None:
    """A redirect's second hop to the same host comes right after the first: it waits its
    turn in the proxy (no refusal, no restart of the download from the first hop)."""
    scripts = {"/to.jpg": [Step(301, {"Location": "/img.jpg"})], "/img.jpg": [Step(body=IMG)]}
    with ScriptServer(scripts) as srv, through_proxy(host_max_connections=1, host_rate=2.0) as px:
        _, stream, err = Fetcher(settings(host_rate=2.0))(("k", srv.url("/to.jpg")))
        assert err is None and stream.getvalue() == IMG
        assert (srv.count("/to.jpg"), srv.count("/img.jpg")) == (1, 1)
        gap = srv.requests[1].start - srv.requests[0].start
        assert gap >= 0.5 - 0.05 and px.counts().get("politeness/host_busy", 0) == 0


@pytest.mark.timeout(60)
def test_proxy_limits_connections_and_rate_per_host() -> None:
    """12 threads want one host at once: the proxy lets 2 in at a time, 5 per second; the
    ones whose turn is more than its queue (2 s) away are sent back and ask again."""
    n = 12
    scripts = {f"/{i}.jpg": [Step(body=IMG, delay=0.3)] for i in range(n)}
    with ScriptServer(scripts) as srv, through_proxy(host_max_connections=2, host_rate=5.0) as px:
        fetch = Fetcher(settings(host_rate=5.0, host_wait_s=20.0))
        with ThreadPoolExecutor(n) as pool:
            got = list(pool.map(lambda i: fetch((i, srv.url(f"/{i}.jpg"))), range(n)))
        starts = sorted(r.start for r in srv.requests)
        peak = srv.max_in_flight
        busy = px.counts().get("politeness/host_busy", 0)
    assert all(err is None for _, _, err in got), [e for _, _, e in got if e]
    assert len(starts) == n and peak <= 2
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert min(gaps) >= 0.2 - 0.05, gaps  # 1 / host_rate apart, give or take scheduling
    assert busy > 0


@pytest.mark.timeout(30)
def test_busy_host_gives_up_after_host_wait() -> None:
    scripts = {"/slow.jpg": [Step(body=IMG, delay=1.0)], "/next.jpg": [Step(body=IMG)]}
    with ScriptServer(scripts) as srv, through_proxy(host_max_connections=1, host_rate=0.0, host_queue_s=0.1):
        fetch = Fetcher(settings(host_wait_s=0.3, host_rate=0.0))
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(fetch, ("a", srv.url("/slow.jpg")))
            time.sleep(0.2)
            second = pool.submit(fetch, ("b", srv.url("/next.jpg")))
            assert first.result()[2] is None
            assert tag_of(second.result()[2]) == "politeness/host_busy"
        assert srv.count("/next.jpg") == 0
