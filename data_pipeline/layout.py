"""Where each stage of a data build writes inside the output directory, and the guard
that refuses to mix two different datasets in one directory.

    OUT/build_config.json  what this directory holds (dataset identity + full config)
    OUT/input/             URL list normalised + safety-checked: NNNNN.parquet + NNNNN.json
    OUT/crawl/             img2dataset output (NNNNN.tar, .parquet, _stats.json)
    OUT/filter/            filter work dir (per-shard records, decisions) + kept.parquet, result.json
    OUT/shards/            final webdataset tars 00000.tar ...
    OUT/manifest.json, OUT/stats.json, OUT/stats.md
    OUT/timings/<stage>.json   wall-clock durations (kept out of the manifest: not reproducible)
    OUT/.lock              held by the build's driver while a stage runs (pretrain.fs.lock_dir)
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from data_pipeline import fsutil
from pretrain.fs import LOCK_NAME


class OutputMismatchError(ValueError):
    """The output directory already holds a build of a different dataset."""


class OutputInUseError(OutputMismatchError):
    """Another live build holds the output directory."""


@dataclass(frozen=True)
class Layout:
    root: str

    def path(self, *parts: str) -> str:
        return fsutil.join(self.root, *parts)

    @property
    def build_config(self) -> str:
        return self.path("build_config.json")

    @property
    def input_dir(self) -> str:
        return self.path("input")

    @property
    def crawl_dir(self) -> str:
        return self.path("crawl")

    @property
    def filter_dir(self) -> str:
        return self.path("filter")

    @property
    def kept(self) -> str:
        return self.path("filter", "kept.parquet")

    @property
    def filter_result(self) -> str:
        return self.path("filter", "result.json")

    @property
    def shards_dir(self) -> str:
        return self.path("shards")

    @property
    def manifest(self) -> str:
        return self.path("manifest.json")

    @property
    def stats_json(self) -> str:
        return self.path("stats.json")

    @property
    def stats_md(self) -> str:
        return self.path("stats.md")

    def timing(self, stage: str) -> str:
        return self.path("timings", f"{stage}.json")


def input_fingerprint(files: list[str]) -> str:
    """sha256 over the input files' names and bytes: a changed URL list is a new dataset."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.rsplit("/", 1)[-1].encode() + b"\0")
        fs, path = fsutil.url_to_fs(f)
        with fs.open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


def bind_output(layout: Layout, identity: dict[str, Any], config: dict[str, Any]) -> None:
    """Record what ``layout.root`` holds, or raise if it already holds something else.

    An empty or new directory is bound to ``identity``; a directory bound to the same
    identity is resumed; a different identity once a stage has written data, or files
    without a build_config.json, is a clear error (never silently mixed or overwritten).
    """
    if fsutil.exists(layout.build_config):
        saved = fsutil.read_json(layout.build_config)
        diffs = _diff(saved.get("identity"), identity)
        if diffs and holds_data(layout):
            shown = "; ".join(diffs[:8]) + (f"; ... ({len(diffs)} differences)" if len(diffs) > 8 else "")
            raise OutputMismatchError(
                f"output {layout.root} already holds a different dataset ({shown}). "
                "Use a new --output directory, or delete this one to rebuild it."
            )
        if diffs or saved.get("config") != config:
            fsutil.write_json(layout.build_config, {"identity": identity, "config": config})
        return
    fs, path = fsutil.url_to_fs(layout.root)
    if fs.exists(path) and [p for p in fs.ls(path, detail=False) if p.rstrip("/").rsplit("/", 1)[-1] != LOCK_NAME]:
        raise OutputMismatchError(
            f"output {layout.root} is not empty and holds no build_config.json: it is not a data "
            "build of this tool. Use an empty or new --output directory."
        )
    fsutil.write_json(layout.build_config, {"identity": identity, "config": config})


def holds_data(layout: Layout) -> bool:
    """Whether any stage has finished something here (a failed first attempt, e.g. with a
    wrong column name, leaves only build_config.json: that may be re-bound freely)."""
    return bool(fsutil.glob(fsutil.join(layout.input_dir, "*.json"))) or any(
        fsutil.exists(p) for p in (layout.crawl_dir, layout.filter_dir, layout.shards_dir, layout.manifest))


def saved_config(layout: Layout) -> dict[str, Any] | None:
    """The full config stored by an earlier stage in this output dir, if any."""
    if not fsutil.exists(layout.build_config):
        return None
    return fsutil.read_json(layout.build_config).get("config")
