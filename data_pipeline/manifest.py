"""``manifest.json`` of a data build: the shard list, total, a braceexpand pattern, the
config used and the tool versions. No wall-clock data: rebuilding the same dataset gives
a byte-identical manifest (durations live in stats.json).

    {"shards": [{"path": "shards/00000.tar", "num_samples": 1000, "sha256": "..."}, ...],
     "total_samples": N, "pattern": "shards/{00000..00003}.tar", "config": {...}, "versions": {...}}
"""
from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

from data_pipeline import __version__


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "data_pipeline": __version__}
    for dist in ("img2dataset", "webdataset", "pillow", "opencv-python-headless", "imagehash", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def brace_pattern(paths: list[str]) -> str | None:
    """'shards/{00000..00003}.tar' for consecutive zero-padded names (None when empty)."""
    if not paths:
        return None
    head, _, first = paths[0].rpartition("/")
    last = paths[-1].rpartition("/")[2]
    a, b = first[: -len(".tar")], last[: -len(".tar")]
    prefix = head + "/" if head else ""
    return f"{prefix}{{{a}..{b}}}.tar"


def build_manifest(shards: list[dict[str, Any]], config: dict[str, Any], samples_per_shard: int) -> dict[str, Any]:
    return {
        "format": "webdataset",
        "keys": ["jpg", "txt", "json"],
        "shards": shards,
        "num_shards": len(shards),
        "total_samples": sum(int(s["num_samples"]) for s in shards),
        "samples_per_shard": samples_per_shard,
        "pattern": brace_pattern([s["path"] for s in shards]),
        "config": config,
        "versions": tool_versions(),
    }
