"""Crawl stage, step 1: read the URL list, refuse unsafe URLs, write img2dataset's input.

Each input file becomes ``OUT/input/NNNNN.parquet`` (columns ``url``, ``caption``,
``input_row`` = the row's global position in the URL list, and the extra columns) holding
only the rows the crawl may fetch, plus ``NNNNN.json`` with how many rows were read and
why the others were refused (address policy, :mod:`data_pipeline.safety`; per-host
opt-outs, robots.txt and TDM-Rep, :mod:`data_pipeline.optout`). Both are written atomically (json last: it marks the file
done), so a rerun skips finished files.

    summary = prepare_inputs(cfg, layout)   # PrepareSummary(files, rows, passed, counts)
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import fsutil
from data_pipeline.config import BuildConfig
from data_pipeline.inputs import list_input_files, read_url_table
from data_pipeline.layout import Layout
from data_pipeline.optout import OptOutChecker
from data_pipeline.safety import AddressPolicy, Resolver, UrlGuard, resolve_host
from pretrain.progress import progress

MISSING_URL = "input/missing_url"


@dataclass
class PrepareSummary:
    files: list[str] = field(default_factory=list)  # prepared parquet files, in crawl order
    rows: int = 0  # rows in the URL list
    passed: list[int] = field(default_factory=list)  # rows handed to the crawl, per file
    counts: dict[str, int] = field(default_factory=dict)  # refusals by "stage/reason"


def _prepare_one(table: pa.Table, first_row: int, guard: UrlGuard, optout: OptOutChecker,
                 bar: Any) -> tuple[pa.Table, Counter[str]]:
    urls = table.column("url").to_pylist()
    reasons = guard.check_many(urls)
    # Opt-outs only for URLs the address check let through: never a robots.txt fetch from
    # a host the crawl would refuse.
    optout.prefetch([u for u, r in zip(urls, reasons) if u and r is None])
    reasons = [r if r is not None or not u else optout.check(u) for u, r in zip(urls, reasons)]
    counts: Counter[str] = Counter()
    keep = []
    for i, (u, r) in enumerate(zip(urls, reasons)):
        if not u:
            counts[MISSING_URL] += 1
        elif r is not None:
            counts[r] += 1
        else:
            keep.append(i)
    bar.update(len(urls))
    table = table.append_column("input_row", pa.array(range(first_row, first_row + len(urls)), pa.int64()))
    return table.take(pa.array(keep, pa.int64())), counts


def address_policy(cfg: BuildConfig) -> AddressPolicy:
    """The crawl's one address policy: the URL check here and the egress proxy use it."""
    return AddressPolicy(cfg.crawl.allow_private_addresses, cfg.crawl.allowed_networks)


def prepare_inputs(cfg: BuildConfig, layout: Layout, policy: AddressPolicy | None = None,
                   resolver: Resolver = resolve_host) -> PrepareSummary:
    c = cfg.crawl
    files, fmt = list_input_files(cfg.urls, c.input_format)
    policy = policy or address_policy(cfg)
    guard = UrlGuard(resolver=resolver, policy=policy)
    optout = OptOutChecker(c, policy, resolver)
    fsutil.makedirs(layout.input_dir)
    fsutil.remove_stale_tmp(layout.input_dir)
    summary = PrepareSummary()
    total: Counter[str] = Counter()
    with optout, progress(desc="prepare: read + safety check + opt-outs", unit="url") as bar:
        for i, src in enumerate(files):
            out = fsutil.join(layout.input_dir, f"{i:05d}.parquet")
            meta_path = fsutil.join(layout.input_dir, f"{i:05d}.json")
            if fsutil.exists(meta_path):  # finished in an earlier run
                meta = fsutil.read_json(meta_path)
                bar.update(meta["rows"])
            else:
                table = read_url_table(src, fmt, c.url_col, c.caption_col, c.extra_columns, c.header)
                kept, counts = _prepare_one(table, summary.rows, guard, optout, bar)
                with fsutil.atomic_open(out) as f:
                    pq.write_table(kept, f)
                meta = {"source": src, "rows": table.num_rows, "passed": kept.num_rows,
                        "first_row": summary.rows, "counts": dict(sorted(counts.items()))}
                fsutil.write_json(meta_path, meta)
            summary.files.append(out)
            summary.rows += meta["rows"]
            summary.passed.append(meta["passed"])
            total.update(meta["counts"])
    summary.counts = dict(sorted(total.items()))
    return summary


def load_prepared(layout: Layout) -> PrepareSummary:
    """The summary of a finished prepare step (for the filter/shard/stats stages)."""
    summary = PrepareSummary()
    total: Counter[str] = Counter()
    for meta_path in fsutil.glob(fsutil.join(layout.input_dir, "*.json")):
        meta = fsutil.read_json(meta_path)
        summary.files.append(meta_path[: -len(".json")] + ".parquet")
        summary.rows += meta["rows"]
        summary.passed.append(meta["passed"])
        total.update(meta["counts"])
    summary.counts = dict(sorted(total.items()))
    return summary
