"""``--retry-failed``: crawl again only the URLs whose last outcome was a transient failure.

A finished crawl's samples that failed for a reason in :data:`data_pipeline.fetch.TRANSIENT`
(timeouts, resets, 429/503 after the retries, deadlines, a busy host, a killed shard)
become a retry round: ``OUT/retry/RRR.parquet`` (the same columns as the prepared input,
``input_row`` included, in input order) and ``OUT/retry/RRR.json`` (rows, first crawl
shard id, number of shards; written last: it marks the round planned). The round is
crawled into new crawl shards numbered after all existing ones; finished crawl shards are
never rewritten. Outcomes are then judged per input row over all crawl shards: a success
in any round wins, else the latest failure counts (:mod:`data_pipeline.crawl_counts`).
Planning a round removes the filter result, the output shards, the manifest and the
stats (they must be derived again with the new samples); the filter's per-tar records
of the old crawl shards are reused.

    rounds = load_rounds(layout)                      # [RetryRound(index, file, first_shard, shards, rows)]
    new = plan_retry_round(layout, plan, samples_per_shard)   # None: nothing to retry
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline import fsutil
from data_pipeline.crawl_counts import row_outcomes
from data_pipeline.fetch import TRANSIENT
from data_pipeline.layout import Layout


@dataclass
class RetryRound:
    index: int
    file: str  # the round's input parquet
    first_shard: int
    shards: int
    rows: int


def retry_dir(layout: Layout) -> str:
    return layout.path("retry")


def load_rounds(layout: Layout) -> list[RetryRound]:
    out = []
    for meta_path in fsutil.glob(fsutil.join(retry_dir(layout), "*.json")):
        m = fsutil.read_json(meta_path)
        out.append(RetryRound(int(m["round"]), meta_path[: -len(".json")] + ".parquet", int(m["first_shard"]),
                              int(m["shards"]), int(m["rows"])))
    return sorted(out, key=lambda r: r.index)


def _invalidate_derived(layout: Layout) -> None:
    """What the filter, shard and stats stages derived from the crawl as it was."""
    for path in (layout.filter_result, layout.kept, layout.manifest, layout.stats_json, layout.stats_md,
                 fsutil.join(layout.filter_dir, "decisions.parquet")):
        if fsutil.exists(path):
            fs, p = fsutil.url_to_fs(path)
            fs.rm(p)
    for tar in fsutil.glob(fsutil.join(layout.shards_dir, "*.tar")):
        fs, p = fsutil.url_to_fs(tar)
        fs.rm(p)


def plan_retry_round(layout: Layout, shard_names: list[str], next_shard: int,
                     samples_per_shard: int) -> RetryRound | None:
    """Write the next round's input from the transient failures among ``shard_names``
    (all crawl shards so far, in order); None when there are none."""
    outcomes = row_outcomes(layout, shard_names)
    retry = {row: shard for row, (reason, shard) in outcomes.items() if reason in TRANSIENT}
    if not retry:
        return None
    inputs = fsutil.glob(fsutil.join(layout.input_dir, "*.parquet"))
    fs, path = fsutil.url_to_fs(inputs[0])
    with fs.open(path, "rb") as f:
        columns = pq.read_schema(f).names  # url, caption, extras..., input_row
    parts = []
    for shard in sorted(set(retry.values())):
        fs, path = fsutil.url_to_fs(fsutil.join(layout.crawl_dir, shard + ".parquet"))
        with fs.open(path, "rb") as f:
            t = pq.read_table(f, columns=columns)
        mask = pa.array([r in retry and retry[r] == shard for r in t.column("input_row").to_pylist()])
        parts.append(t.filter(mask))
    table = pa.concat_tables(parts)
    table = table.take(pc.sort_indices(table, [("input_row", "ascending")]))
    rounds = load_rounds(layout)
    index = (rounds[-1].index + 1) if rounds else 1
    base = fsutil.join(retry_dir(layout), f"{index:03d}")
    _invalidate_derived(layout)
    with fsutil.atomic_open(base + ".parquet") as f:
        pq.write_table(table, f)
    shards = math.ceil(table.num_rows / samples_per_shard)
    fsutil.write_json(base + ".json", {"round": index, "rows": table.num_rows, "first_shard": next_shard,
                                       "shards": shards})
    return RetryRound(index, base + ".parquet", next_shard, shards, table.num_rows)
