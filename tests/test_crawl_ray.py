"""The crawl through img2dataset's ray distributor, on a local Ray instance the test starts.

The test owns the Ray instance (as a cluster user who connected to one would): its workers
start from Ray's own processes, not from the crawl, so they get the egress proxy only
through the task's runtime_env (data_pipeline/crawl.py `_ray_env`); a redirect to the
private side is refused at connect time there too. Ray listens on 127.0.0.1 only, with
usage statistics and the dashboard off. Skips cleanly where ray is not installed.

Run: .venv/bin/python -m pytest -q tests/test_crawl_ray.py   (~30-60 s)
"""
from __future__ import annotations

import json
import os
import sys
import tarfile
from pathlib import Path

import pytest

import data_server_cases as cases
from data_pipeline.serve import ImageServer

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    names = ("RAY_USAGE_STATS_ENABLED", "OPENCV_IO_MAX_IMAGE_PIXELS")
    saved = {k: os.environ.get(k) for k in names}
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no usage report leaves the machine
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = "89478485"
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}})
    yield ray
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.timeout(400)
def test_ray_distributor_crawls_through_the_proxy(ray_instance, tmp_path: Path) -> None:
    from data_pipeline import pipeline
    from data_pipeline.config import load_config
    from data_pipeline.crawl_counts import crawl_accounting
    from data_pipeline.layout import Layout
    from data_pipeline.prepare import load_prepared

    site = cases.make_site(tmp_path / "site", n_good=4)
    wanted = {"download/http_error", "decode/undecodable"}
    picked, seen = [], set()
    for c in site.cases:
        if c.expected == cases.KEPT or (c.expected in wanted and c.expected not in seen):
            picked.append(c)
            seen.add(c.expected)
    site.behaviours["/to_private.jpg"] = cases.Behaviour(status=302, headers={"Location": "http://127.0.0.2:9/x.jpg"})
    picked.append(cases.Case("to_private.jpg", b"a plain photo of a garment on a table", "safety/redirect_to_private"))
    site.cases = picked
    with ImageServer(site.root, behaviours=site.behaviours) as srv:
        site.url_table(srv.base_url).to_parquet(tmp_path / "urls.parquet")
        cfg = load_config(None, [
            ("urls", str(tmp_path / "urls.parquet")), ("output", str(tmp_path / "out")),
            ("processes", 2), ("crawl.distributor", "ray"), ("crawl.thread_count", 4),
            ("crawl.number_sample_per_shard", 4), ("crawl.timeout", cases.TIMEOUT_S),
            ("crawl.allowed_networks", ["127.0.0.1/32"]),
        ])
        pipeline.crawl(cfg)
    layout = Layout(cfg.output)
    prep = load_prepared(layout)
    assert prep.rows == len(picked) == 7
    names = [f"{i:05d}" for i in range(2)]  # 7 crawlable URLs, 4 per crawl shard
    assert sorted(p.name for p in (tmp_path / "out" / "crawl").glob("*.tar")) == [n + ".tar" for n in names]
    counts, successes = crawl_accounting(layout, names, sum(prep.passed))
    # Only the proxy counts redirect_to_private: a Ray worker fetching directly would follow
    # the redirect itself and fail as a download error instead.
    expected = {k: v for k, v in site.expected_counts().items() if k != cases.KEPT}
    assert counts == expected and successes == 4
    captions = []
    for n in names:
        with tarfile.open(tmp_path / "out" / "crawl" / f"{n}.tar") as tf:
            captions += [json.loads(tf.extractfile(m).read())["caption"] for m in tf if m.name.endswith(".json")]
    assert sorted(captions) == sorted(c.caption.decode() for c in picked if c.expected == cases.KEPT)
