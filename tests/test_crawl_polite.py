"""Politeness, retries and bounded time in a real crawl (img2dataset, two crawl processes,
the egress proxy, the shard watchdog), then ``--retry-failed``, against scripted loopback
servers (tests/polite_server.py) that count requests per path and record each request's
User-Agent and timing. Host names are answered by a test resolver (127.0.0.1), so the two
servers are two hosts to the per-host limits.

Run: .venv/bin/python -m pytest -q tests/test_crawl_polite.py   (~60-90 s)
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest
from PIL import Image

import data_server_cases as cases
from polite_server import ScriptServer, Step

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow]
UA = "clip-pretrain/1.0 (+https://example.org/crawler)"
HOSTS = {"misc.test": ["127.0.0.1"], "polite.test": ["127.0.0.1"]}


def resolver(host: str, port: int) -> list[str]:
    return HOSTS.get(host, [])  # never a real DNS query


def jpeg(seed: int) -> bytes:
    a = np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    b = io.BytesIO()
    Image.fromarray(a).resize((128, 128), Image.NEAREST).save(b, "JPEG", quality=90)
    return b.getvalue()


def url_table(rows: list[str], path: Path) -> None:
    pd.DataFrame({"url": rows, "caption": [cases.PHRASES[i % len(cases.PHRASES)].format(c="shirt") + f" {i}"
                                           for i in range(len(rows))]}).to_parquet(path)


def config(tmp: Path, **over):
    from data_pipeline.config import load_config

    base = {"urls": str(tmp / "urls.parquet"), "output": str(tmp / "out"), "processes": 2,
            "crawl.thread_count": 8, "crawl.number_sample_per_shard": 6, "crawl.timeout": 3.0,
            "crawl.download_deadline": 2.0, "crawl.retries": 2, "crawl.backoff_s": 0.05,
            "crawl.max_retry_after_s": 3.0, "crawl.host_max_connections": 2, "crawl.host_rate": 5.0,
            "crawl.host_wait_s": 60.0, "crawl.contact_url": "https://example.org/crawler",
            "crawl.allowed_networks": ["127.0.0.1/32"], **cases.FILTER_OVERRIDES}
    base.update(over)
    return load_config(None, list(base.items()))


def stages(cfg, retry_failed: bool = False):
    from data_pipeline import pipeline
    from data_pipeline.crawl import run_crawl

    layout = pipeline.bind(cfg, with_input=True)
    run_crawl(cfg, layout, resolver=resolver, retry_failed=retry_failed)
    pipeline.filter(cfg)
    pipeline.shard(cfg)
    return pipeline.stats(cfg, echo=False)


MISC = {  # path: (script, outcome of the first build)
    "/good_0.jpg": ([Step(body=jpeg(0))], cases.KEPT),
    "/good_1.jpg": ([Step(body=jpeg(1))], cases.KEPT),
    "/429.jpg": ([Step(429, {"Retry-After": "1"}), Step(body=jpeg(2))], cases.KEPT),
    "/reset.jpg": ([Step(kind="reset"), Step(body=jpeg(3))], cases.KEPT),
    "/503.jpg": ([Step(503)], "download/unavailable"),
    "/503long.jpg": ([Step(503, {"Retry-After": "3600"})], "download/unavailable"),
    "/404.jpg": ([Step(404)], "download/http_error"),
    "/403.jpg": ([Step(403)], "download/http_error"),
    "/page.jpg": ([Step(body=b"<html>no image</html>", headers={"Content-Type": "text/html"})],
                  "decode/undecodable"),
    "/tdm.jpg": ([Step(body=jpeg(4), headers={"tdm-reservation": "1"})], "optout/tdm_reservation_header"),
    "/silent.jpg": ([Step(kind="silent")], "safety/deadline"),
    "/drip.jpg": ([Step(kind="drip")], "download/deadline"),
}
TRANSIENT = ["/503.jpg", "/503long.jpg", "/silent.jpg", "/drip.jpg"]
POLITE = [f"/p{i}.jpg" for i in range(8)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("polite")
    misc = ScriptServer({p: s for p, (s, _) in MISC.items()}).start()
    polite = ScriptServer({p: [Step(body=jpeg(100 + i), delay=0.3)] for i, p in enumerate(POLITE)}).start()
    misc_urls = [misc.url(p, "misc.test") for p in MISC]
    polite_urls = [polite.url(p, "polite.test") for p in POLITE]
    rows = []
    while misc_urls or polite_urls:  # every crawl shard gets polite.test URLs: processes compete for it
        rows += [misc_urls.pop(0) for _ in range(min(3, len(misc_urls)))]
        rows += [polite_urls.pop(0) for _ in range(min(2, len(polite_urls)))]
    url_table(rows, tmp / "urls.parquet")
    transient_rows = sorted(rows.index(misc.url(p, "misc.test")) for p in TRANSIENT)
    cfg = config(tmp)
    t0 = time.monotonic()
    first = stages(cfg)
    first_s = time.monotonic() - t0
    crawl = tmp / "out" / "crawl"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in crawl.iterdir() if p.is_file()}
    counts_before = {p: misc.count(p) for p in MISC}
    polite_requests = list(polite.requests)
    shard_stats = [json.loads(p.read_text()) for p in sorted(crawl.glob("*_stats.json"))]
    for p in TRANSIENT:  # the hosts recovered
        misc.set_script(p, [Step(body=jpeg(200 + TRANSIENT.index(p)))])
    second = stages(cfg, retry_failed=True)
    counts_after = {p: misc.count(p) for p in MISC}
    agents = misc.user_agents() | polite.user_agents()
    misc.stop()
    polite.stop()
    yield {"first": first, "first_s": first_s, "second": second, "before": before, "crawl": crawl, "rows": rows,
           "counts_before": counts_before, "counts_after": counts_after, "agents": agents,
           "polite_requests": polite_requests, "shard_stats": shard_stats, "transient_rows": transient_rows}


def _expected() -> dict[str, int]:
    out: dict[str, int] = {}
    for _, r in MISC.values():
        if r != cases.KEPT:
            out[r] = out.get(r, 0) + 1
    return out


@pytest.mark.timeout(400)
def test_each_failure_counted_and_bounded(world) -> None:
    s = world["first"]
    assert s["counts"] == _expected()
    assert s["kept"] == 4 + len(POLITE) and s["unaccounted"] == 0
    assert world["first_s"] < 120  # silent and dripping hosts cost a deadline each, not a hang


@pytest.mark.timeout(400)
def test_transient_retried_permanent_never(world) -> None:
    n = world["counts_before"]
    assert n["/429.jpg"] == 2 and n["/reset.jpg"] == 2 and n["/503.jpg"] == 3  # 1 + crawl.retries
    for p in ("/503long.jpg", "/404.jpg", "/403.jpg", "/page.jpg", "/tdm.jpg", "/silent.jpg", "/drip.jpg",
              "/good_0.jpg"):
        assert n[p] == 1, p


@pytest.mark.timeout(400)
def test_every_request_names_the_project_and_contact(world) -> None:
    assert world["agents"] == {UA}  # robots.txt, tdmrep.json and every image download


@pytest.mark.timeout(400)
def test_one_host_limited_across_processes(world) -> None:
    reqs = [r for r in world["polite_requests"] if r.path in POLITE]
    assert len(reqs) == len(POLITE)
    events = sorted([(r.start, 1) for r in reqs] + [(r.end, -1) for r in reqs])
    peak = cur = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    assert peak <= 2
    starts = sorted(r.start for r in reqs)
    assert min(b - a for a, b in zip(starts, starts[1:])) >= 0.2 - 0.05
    # and the crawl shards did run at the same time, in two processes
    spans = sorted((st["start_time"], st["end_time"]) for st in world["shard_stats"])
    assert any(b0 < a1 for (a0, a1), (b0, b1) in zip(spans, spans[1:]))


@pytest.mark.timeout(400)
def test_retry_failed_fetches_only_transient_into_new_shards(world) -> None:
    crawl = world["crawl"]
    for name, (data, mtime) in world["before"].items():
        p = crawl / name
        if name == "egress.json":
            continue  # the proxy counts are summed over runs
        assert p.read_bytes() == data and p.stat().st_mtime_ns == mtime, name
    new = sorted(p for p in crawl.glob("*.parquet") if p.name not in world["before"])
    assert new, "no new crawl shard"
    retried = pd.concat([pq.read_table(p).to_pandas() for p in new])
    assert sorted(retried["input_row"].tolist()) == world["transient_rows"]
    assert (retried["status"] == "success").all()
    before, after = world["counts_before"], world["counts_after"]
    for p in MISC:
        assert after[p] == before[p] + (1 if p in TRANSIENT else 0), p
    s = world["second"]
    assert s["kept"] == world["first"]["kept"] + len(TRANSIENT) and s["unaccounted"] == 0
    expected = {k: v for k, v in _expected().items() if k not in ("download/unavailable", "safety/deadline",
                                                                     "download/deadline")}
    assert s["counts"] == expected


def _stop_workers(stop: threading.Event, stopped: list[int]) -> None:
    """SIGSTOP every crawl shard process as soon as it appears: a stuck crawl process."""
    me = psutil.Process()
    while not stop.is_set():
        for child in me.children(recursive=True):
            try:
                # a shard's process is the child of a crawl pool worker (forked or exec'd)
                if child.pid not in stopped and "spawn_main" in " ".join(child.parent().cmdline()):
                    os.kill(child.pid, signal.SIGSTOP)
                    stopped.append(child.pid)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        time.sleep(0.02)


@pytest.mark.timeout(300)
def test_watchdog_kills_a_stuck_shard_and_the_build_finishes(tmp_path: Path) -> None:
    with ScriptServer({f"/w{i}.jpg": [Step(body=jpeg(300 + i))] for i in range(3)}) as srv:
        url_table([srv.url(f"/w{i}.jpg") for i in range(3)], tmp_path / "urls.parquet")
        cfg = config(tmp_path, processes=1, **{"crawl.shard_deadline": 1.0, "crawl.shard_grace_s": 0.5,
                                               "crawl.max_shard_retry": 1})
        stop, stopped = threading.Event(), []
        t = threading.Thread(target=_stop_workers, args=(stop, stopped), daemon=True)
        t.start()
        t0 = time.monotonic()
        try:
            first = stages(cfg)
        finally:
            stop.set()
            t.join()
        elapsed = time.monotonic() - t0
        assert len(stopped) == 2  # the first attempt and its one retry
        assert first["counts"] == {"crawl/shard_killed": 3} and first["kept"] == 0
        assert elapsed < 90  # two kills at 1 + 2 + 0.5 s, not a hang
        kills = json.loads((tmp_path / "out" / "crawl" / "00000_watchdog.json").read_text())
        assert kills["kills"] == 2
        assert first["watchdog_kills"] == 2
        assert "| watchdog | stuck crawl processes killed | 2 |" in (tmp_path / "out" / "stats.md").read_text()
        # killed samples are transient: a --retry-failed run (the command line) fetches them
        r = subprocess.run([sys.executable, "-m", "data_pipeline", "build", "--output", str(tmp_path / "out"),
                            "--retry-failed", "--crawl.shard_deadline=60"], cwd=ROOT, capture_output=True,
                           text=True, timeout=240,
                           env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        second = json.loads((tmp_path / "out" / "stats.json").read_text())
        assert second["kept"] == 3 and second["counts"] == {}
        assert all(srv.count(f"/w{i}.jpg") >= 1 for i in range(3))
