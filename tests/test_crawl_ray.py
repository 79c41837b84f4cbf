"""The crawl through img2dataset's ray distributor, on a local Ray instance the test starts.

The test owns the Ray instance (as a cluster user who connected to one would): its workers
start from Ray's own processes, not from the crawl, so they get the egress proxy only
through the task's runtime_env (data_pipeline/crawl.py `_ray_env`); a redirect to the
private side is refused at connect time there too. Ray listens on 127.0.0.1 only, with
usage statistics and the dashboard off. Skips cleanly where ray is not installed.

Run: .venv/bin/python -m pytest -q tests/test_crawl_ray.py   (~30-60 s)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import data_server_cases as cases

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine
        mp.setenv("OPENCV_IO_MAX_IMAGE_PIXELS", "89478485")
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}})
        yield ray
        ray.shutdown()


@pytest.mark.timeout(400)
def test_ray_distributor_crawls_through_the_proxy(ray_instance, tmp_path: Path) -> None:
    cases.check_distributor_crawl(tmp_path, "ray", n_good=4, wanted={"download/http_error", "decode/undecodable"})
