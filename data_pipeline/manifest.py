"""``manifest.json`` of a data build: the shard list, total, a braceexpand pattern, the
config used and the tool versions (the format and its reading rules: pretrain.shards.manifest). No wall-clock data: rebuilding the same dataset gives
a byte-identical manifest (durations live in stats.json).

    {"shards": [{"path": "shards/00000.tar", "num_samples": 1000, "sha256": "..."}, ...],
     "total_samples": N, "pattern": "shards/{00000..00003}.tar", "config": {...}, "versions": {...}}
"""
from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

from data_pipeline import __version__
from pretrain.shards.manifest import make_manifest


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "data_pipeline": __version__}
    for dist in ("img2dataset", "webdataset", "pillow", "opencv-python-headless", "imagehash", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def build_manifest(shards: list[dict[str, Any]], config: dict[str, Any], samples_per_shard: int) -> dict[str, Any]:
    """The build's manifest record, in the shard contract's one format (pretrain.shards.manifest)."""
    return make_manifest(shards, samples_per_shard, ["jpg", "txt", "json"], config=config, versions=tool_versions())
