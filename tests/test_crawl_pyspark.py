"""The crawl through img2dataset's pyspark distributor, in Spark's local mode.

The test owns the SparkSession (as a cluster user would); img2dataset picks up the active
session. Skips cleanly where pyspark or Java is missing.

Run: .venv/bin/python -m pytest -q tests/test_crawl_pyspark.py   (~30-60 s)
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import data_server_cases as cases

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def spark():
    pyspark = pytest.importorskip("pyspark")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYSPARK_PYTHON", sys.executable)
        mp.setenv("PYSPARK_DRIVER_PYTHON", sys.executable)
        # Executors inherit the driver's environment in local mode: the decode cap too.
        mp.setenv("OPENCV_IO_MAX_IMAGE_PIXELS", "89478485")
        try:
            from pyspark.sql import SparkSession

            session = (SparkSession.builder.master("local[2]").appName("clip-data-test")
                       .config("spark.ui.enabled", "false").config("spark.driver.memory", "1g")
                       .config("spark.sql.shuffle.partitions", "2").getOrCreate())
        except Exception as e:  # no Java, blocked ports, ...
            pytest.skip(f"pyspark {pyspark.__version__} cannot start a local session: {e}")
        yield session
        session.stop()


@pytest.mark.timeout(400)
def test_pyspark_distributor_crawls_and_counts(spark, tmp_path: Path) -> None:
    # the good samples, one case of each crawl-stage failure kind, and a prepare-time refusal
    cases.check_distributor_crawl(tmp_path, "pyspark", n_good=6, wanted={
        "download/http_error", "download/opt_out", "decode/undecodable", "decode/empty_body",
        "safety/private_address"})
