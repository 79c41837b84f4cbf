"""The crawl through img2dataset's pyspark distributor, in Spark's local mode.

The test owns the SparkSession (as a cluster user would); img2dataset picks up the active
session. Skips cleanly where pyspark or Java is missing.

Run: .venv/bin/python -m pytest -q tests/test_crawl_pyspark.py   (~30-60 s)
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
def spark():
    pyspark = pytest.importorskip("pyspark")
    names = ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "OPENCV_IO_MAX_IMAGE_PIXELS")
    saved = {k: os.environ.get(k) for k in names}
    os.environ["PYSPARK_PYTHON"] = os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    # Executors inherit the driver's environment in local mode: the decode cap too.
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = "89478485"
    try:
        from pyspark.sql import SparkSession

        session = (SparkSession.builder.master("local[2]").appName("clip-data-test")
                   .config("spark.ui.enabled", "false").config("spark.driver.memory", "1g")
                   .config("spark.sql.shuffle.partitions", "2").getOrCreate())
    except Exception as e:  # no Java, blocked ports, ...
        pytest.skip(f"pyspark {pyspark.__version__} cannot start a local session: {e}")
    yield session
    session.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.timeout(400)
def test_pyspark_distributor_crawls_and_counts(spark, tmp_path: Path) -> None:
    from data_pipeline import pipeline
    from data_pipeline.config import load_config
    from data_pipeline.crawl_counts import crawl_accounting
    from data_pipeline.layout import Layout
    from data_pipeline.prepare import load_prepared

    site = cases.make_site(tmp_path / "site", n_good=6)
    # the good samples and one case of each crawl-stage failure kind
    wanted = {"download/http_error", "download/opt_out", "decode/undecodable", "decode/empty_body",
              "safety/private_address"}
    picked, seen = [], set()
    for c in site.cases:
        if c.expected == cases.KEPT or (c.expected in wanted and c.expected not in seen):
            picked.append(c)
            seen.add(c.expected)
    # Executors fetch through the crawl's egress proxy (the session existed before the crawl
    # set its environment): a redirect to the private side is refused at connect time.
    site.behaviours["/to_private.jpg"] = cases.Behaviour(status=302, headers={"Location": "http://127.0.0.2:9/x.jpg"})
    picked.append(cases.Case("to_private.jpg", b"a plain photo of a garment on a table", "safety/redirect_to_private"))
    site.cases = picked
    with ImageServer(site.root, behaviours=site.behaviours) as srv:
        site.url_table(srv.base_url).to_parquet(tmp_path / "urls.parquet")
        cfg = load_config(None, [
            ("urls", str(tmp_path / "urls.parquet")), ("output", str(tmp_path / "out")),
            ("processes", 2), ("crawl.distributor", "pyspark"), ("crawl.thread_count", 4),
            ("crawl.number_sample_per_shard", 4), ("crawl.timeout", cases.TIMEOUT_S),
            ("crawl.allowed_networks", ["127.0.0.1/32"]),
        ])
        pipeline.crawl(cfg)
    layout = Layout(cfg.output)
    prep = load_prepared(layout)
    assert prep.rows == len(picked) == 12 and prep.counts == {"safety/private_address": 1}
    names = [f"{i:05d}" for i in range(3)]  # 11 crawlable URLs, 4 per crawl shard
    assert sorted(p.name for p in (tmp_path / "out" / "crawl").glob("*.tar")) == [n + ".tar" for n in names]
    counts, successes = crawl_accounting(layout, names, sum(prep.passed))
    expected = {k: v for k, v in site.expected_counts().items() if k not in (cases.KEPT, "safety/private_address")}
    assert counts == expected and successes == 6
    captions = []
    for n in names:
        with tarfile.open(tmp_path / "out" / "crawl" / f"{n}.tar") as tf:
            captions += [json.loads(tf.extractfile(m).read())["caption"] for m in tf if m.name.endswith(".json")]
    assert sorted(captions) == sorted(c.caption.decode() for c in picked if c.expected == cases.KEPT)
