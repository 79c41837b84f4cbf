"""The demo keeps its own test split out of its training shards: test-split images planted
in the embedded web (rendered as the web serves its training images) are dropped by the
data build's decontamination (filter/eval_overlap, counted in stats.json), and no shard
sample comes from one of their URLs. The demo's own data build (``build_data``: real local
HTTP server, the data build CLI), with a small web and more planted test images.

Run: .venv/bin/python -m pytest -q tests/test_demo_decontam.py   (~40 s)
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import webdataset as wds

pytestmark = [pytest.mark.slow]


@pytest.mark.timeout(600)
def test_demo_shards_hold_no_test_split_image(tmp_path: Path) -> None:
    from pretrain.demo.main import build_data
    from pretrain.demo.web import NoiseRates

    out = tmp_path / "demo"
    out.mkdir()
    manifest_path, manifest = build_data(out, 150, NoiseRates(test_split_image=0.1))
    urls = pd.read_parquet(out / "urls.parquet")
    planted = set(urls.loc[urls["noise"] == "test_split_image", "url"])
    assert len(planted) == 15
    stats = json.loads((out / "data" / "stats.json").read_text())
    assert stats["counts"].get("filter/eval_overlap", 0) >= len(planted), stats["counts"]
    assert stats["unaccounted"] == 0
    shard_urls = [json.loads(s["json"])["url"] for s in wds.WebDataset(
        [str(out / "data" / s["path"]) for s in manifest["shards"]], shardshuffle=False)]
    assert len(shard_urls) == manifest["total_samples"] > 100
    assert not planted & set(shard_urls)
    # the decontamination set is the whole test split the demo evaluates on
    from pretrain.packaged_data import default_fashion_like

    assert len(list((out / "eval_images").glob("*.png"))) == len(default_fashion_like("test"))
