"""Per-host opt-outs (data_pipeline.optout) in a real img2dataset crawl: robots.txt matched
for the crawler's own token, TDM-Rep's tdmrep.json location patterns, robots.txt that is
missing (allowed) or failing (crawl.robots_unreachable=deny), and a robots.txt on a
private address never fetched. Each loopback port is its own origin (RFC 9309 2.3: rules
are per scheme, host and port); counts come from the servers' own request logs.

Run: .venv/bin/python -m pytest -q tests/test_crawl_optout.py   (~20 s)
"""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import data_server_cases as cases
from data_pipeline.serve import Behaviour, ImageServer

pytestmark = [pytest.mark.slow]

ROBOTS = b"User-agent: *\nDisallow: /\n\nUser-agent: clip-pretrain\nDisallow: /private/\n"
TDM = [{"location": "/tdm/*", "tdm-reservation": 1}, {"location": "/tdm/free/*", "tdm-reservation": 0}]


def _jpeg(seed: int) -> bytes:
    a = np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    b = io.BytesIO()
    Image.fromarray(a).resize((128, 128), Image.NEAREST).save(b, "JPEG", quality=90)
    return b.getvalue()


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    from data_pipeline import pipeline
    from data_pipeline.config import load_config

    tmp = tmp_path_factory.mktemp("optout")
    site = tmp / "site"
    for i, rel in enumerate(["a.jpg", "a2.jpg", "private/p.jpg", "tdm/t.jpg", "tdm/free/f.jpg", "b.jpg", "c.jpg"]):
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(_jpeg(i))
    a_beh = {"/robots.txt": Behaviour(body=ROBOTS, headers={"Content-Type": "text/plain"}),
             "/.well-known/tdmrep.json": Behaviour(body=json.dumps(TDM).encode())}
    c_beh = {"/robots.txt": Behaviour(status=503)}
    with ImageServer(site, behaviours=a_beh) as a, ImageServer(site) as b, \
            ImageServer(site, behaviours=c_beh) as c, ImageServer(site, host="127.0.0.2") as priv:
        rows = [
            (a.url("a.jpg"), cases.KEPT), (a.url("a2.jpg") + "?v=2", cases.KEPT),
            (a.url("private/p.jpg"), "optout/robots_txt"),
            (a.url("tdm/t.jpg"), "optout/tdmrep"), (a.url("tdm/free/f.jpg"), cases.KEPT),
            (b.url("b.jpg"), cases.KEPT),  # robots.txt and tdmrep.json 404: allowed
            (c.url("c.jpg"), "optout/robots_unreachable"),
            (priv.url("b.jpg"), "safety/private_address"),
        ]
        pd.DataFrame({"url": [u for u, _ in rows],
                      "caption": [cases.PHRASES[i % len(cases.PHRASES)].format(c="shirt") + f" {i}"
                                  for i in range(len(rows))]}).to_parquet(tmp / "urls.parquet")
        cfg = load_config(None, [
            ("urls", str(tmp / "urls.parquet")), ("output", str(tmp / "out")), ("processes", 1),
            ("crawl.thread_count", 4), ("crawl.number_sample_per_shard", 100), ("crawl.timeout", 4.0),
            ("crawl.allowed_networks", ["127.0.0.1/32"]), ("crawl.robots_unreachable", "deny"),
            ("crawl.contact_url", "https://example.org/crawler"),
        ] + list(cases.BUILD_OVERRIDES.items()))
        pipeline.bind(cfg, with_input=True)
        pipeline.crawl(cfg)
        pipeline.filter(cfg)
        pipeline.shard(cfg)
        stats = pipeline.stats(cfg, echo=False)
        logs = {n: dict(s.requests) for n, s in (("a", a), ("b", b), ("c", c), ("priv", priv))}
    yield {"rows": rows, "stats": stats, "logs": logs}


@pytest.mark.timeout(120)
def test_each_optout_counted_under_its_reason(crawl) -> None:
    expected: dict[str, int] = {}
    for _, r in crawl["rows"]:
        if r != cases.KEPT:
            expected[r] = expected.get(r, 0) + 1
    assert crawl["stats"]["counts"] == expected
    assert crawl["stats"]["kept"] == 4


@pytest.mark.timeout(120)
def test_host_files_fetched_once_per_host_and_optouts_never_fetched(crawl) -> None:
    a, b, c, priv = (crawl["logs"][k] for k in ("a", "b", "c", "priv"))
    assert a["/robots.txt"] == 1 and a["/.well-known/tdmrep.json"] == 1
    assert b["/robots.txt"] == 1 and c["/robots.txt"] == 1
    assert "/private/p.jpg" not in a and "/tdm/t.jpg" not in a and "/c.jpg" not in c
    assert a["/a.jpg"] == 1 and a["/a2.jpg"] == 1 and a["/tdm/free/f.jpg"] == 1 and b["/b.jpg"] == 1
    assert priv == {}  # not even robots.txt from the private address


@pytest.mark.timeout(30)
def test_silent_robots_host_bounded_by_robots_deadline() -> None:
    """A host that accepts and never answers costs one robots_deadline, then counts as unreachable."""
    import socket
    import time

    from data_pipeline.config import load_config
    from data_pipeline.optout import ROBOTS_UNREACHABLE, OptOutChecker
    from data_pipeline.safety import AddressPolicy

    silent = socket.create_server(("127.0.0.1", 0), backlog=16)  # the kernel accepts; nobody reads
    port = silent.getsockname()[1]
    cfg = load_config(None, [("crawl.robots_deadline", 1.0), ("crawl.robots_unreachable", "deny")])
    t0 = time.monotonic()
    with OptOutChecker(cfg.crawl, AddressPolicy(False, ["127.0.0.1/32"])) as checker:
        urls = [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(3)]
        checker.prefetch(urls)
        assert [checker.check(u) for u in urls] == [ROBOTS_UNREACHABLE] * 3
    assert time.monotonic() - t0 < 6.0  # robots.txt and tdmrep.json: about one deadline each
    silent.close()
