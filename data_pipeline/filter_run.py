"""Filter stage orchestration: run :func:`data_pipeline.filter.filter_stage` over the crawl
tars and keep its outcome in the output directory.

The rules, the parallel per-shard pass and the global dedup/balancing pass live in
:mod:`data_pipeline.filter` (resumable on its own: finished per-shard records are reused).
This module stores what the shard stage needs, atomically and json last (the json marks
the stage done): ``filter/kept.parquet`` (kept samples in output order) and
``filter/result.json`` (rejection counts by reason, number of samples in).

    outcome = run_filter(cfg, layout, crawl_tars)   # FilterOutcome(kept, counts, total_in)
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import fsutil
from data_pipeline.config import BuildConfig
from data_pipeline.layout import Layout

REQUIRED = ("source_tar", "key", "url", "caption", "sha256")


@dataclass
class FilterOutcome:
    kept: pd.DataFrame
    counts: dict[str, int]
    total_in: int


def load_filter_outcome(layout: Layout) -> FilterOutcome | None:
    if not fsutil.exists(layout.filter_result):
        return None
    result = fsutil.read_json(layout.filter_result)
    fs, path = fsutil.url_to_fs(layout.kept)
    with fs.open(path, "rb") as f:
        kept = pq.read_table(f).to_pandas()
    return FilterOutcome(kept, {k: int(v) for k, v in result["counts"].items()}, int(result["total_in"]))


def run_filter(cfg: BuildConfig, layout: Layout, tars: list[str]) -> FilterOutcome:
    done = load_filter_outcome(layout)
    if done is not None:
        return done
    from data_pipeline.filter import filter_stage

    result = filter_stage(list(tars), layout.filter_dir, cfg.filter, cfg.resolved_processes())
    kept = result.kept.reset_index(drop=True)
    missing = [c for c in REQUIRED if c not in kept.columns]
    if missing:
        raise RuntimeError(f"filter_stage returned kept samples without column(s) {missing}")
    # Tar paths are absolute and differ between output dirs; the shard stage resolves
    # them again from the crawl dir, so only the file name is stored.
    kept["source_tar"] = kept["source_tar"].map(lambda p: str(p).rstrip("/").rsplit("/", 1)[-1])
    with fsutil.atomic_open(layout.kept) as f:
        pq.write_table(pa.Table.from_pandas(kept, preserve_index=False), f)
    counts = {str(k): int(v) for k, v in sorted(result.counts.items()) if int(v)}
    fsutil.write_json(layout.filter_result, {"counts": counts, "total_in": int(result.total_in),
                                             "kept": int(len(kept))})
    return FilterOutcome(kept, counts, int(result.total_in))
