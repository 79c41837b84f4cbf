"""decisions.parquet, the filter's one record of every sample's fate: written as a stream.

Both engines of pass 2 write it through ``write_decisions``: record batches in (source_tar,
key) order go into row groups of exactly ``ROW_GROUP`` rows (the last one shorter), with
RECORD_SCHEMA and no pandas metadata, so the bytes depend only on the rows, not on how the
engine happened to batch them. Memory is one row group, whatever the number of rows; the
per-reason counts are summed on the way.

    counts, total = write_decisions(batches, "work/decisions.parquet")
    kept = read_kept("work/decisions.parquet")    # pandas, kept rows, without "decision"
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline.filter import fsio
from data_pipeline.filter.shard_pass import KEPT, RECORD_SCHEMA

# Rows per row group: bounds the writer's memory (~100 B of metadata a row here: tens of MB).
ROW_GROUP = 1 << 17


def write_decisions(batches: Iterable[pa.RecordBatch | pa.Table], url: str) -> tuple[dict[str, int], int]:
    """Write the batches (in order) atomically to ``url``; returns ({rejection reason: n}, rows)."""
    counts: Counter[str] = Counter()
    total = 0
    pending: list[pa.Table] = []
    n_pending = 0
    with fsio.atomic_open(url, "wb") as f, pq.ParquetWriter(f, RECORD_SCHEMA) as w:
        def flush(final: bool) -> None:
            nonlocal pending, n_pending
            if not pending:
                return
            t = pa.concat_tables(pending)
            start = 0
            while t.num_rows - start >= ROW_GROUP or (final and start < t.num_rows):
                # one contiguous chunk: page boundaries then do not depend on the input batching
                w.write_table(t.slice(start, ROW_GROUP).combine_chunks(), row_group_size=ROW_GROUP)
                start += ROW_GROUP
            rest = t.slice(start)
            pending, n_pending = ([rest] if rest.num_rows else []), rest.num_rows

        for b in batches:
            t = b if isinstance(b, pa.Table) else pa.Table.from_batches([b])
            t = t.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA).replace_schema_metadata(None)
            if t.num_rows == 0:
                continue
            # "not computed" is stored as null whichever engine wrote it (pandas turns NaN
            # into null on the way to Arrow; Spark keeps NaN)
            score = t.column("clip_score")
            t = t.set_column(t.schema.get_field_index("clip_score"), "clip_score",
                             pc.if_else(pc.is_nan(score), pa.scalar(None, pa.float64()), score))
            total += t.num_rows
            vc = pc.value_counts(t.column("decision"))
            for v, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
                if v != KEPT:
                    counts[v] += n
            pending.append(t)
            n_pending += t.num_rows
            if n_pending >= ROW_GROUP:
                flush(final=False)
        flush(final=True)
    return dict(sorted(counts.items())), total


def read_kept(url: str):
    """The kept rows of a decisions file, as pandas (balance_entries as plain lists)."""
    import fsspec

    cols = [n for n in RECORD_SCHEMA.names if n != "decision"]
    with fsspec.open(url, "rb") as f:
        # filtered row group by row group: the rejected rows are never all in memory
        table = pq.read_table(f, columns=cols, filters=[("decision", "=", KEPT)])
    kept = table.to_pandas()
    kept["balance_entries"] = kept["balance_entries"].map(list)  # numpy arrays -> plain lists
    return kept
