"""Pass 2 of the filter on Spark: the same decisions as ``global_pass.decide``, row for row.

First occurrence is the smallest (source_tar, key) (Spark compares strings by UTF-8 bytes,
which is code-point order, as pandas sorts). Steps, each over the rows still alive:

- exact duplicates (image SHA-256, then (url, caption)): ``row_number()`` over a window per
  value, ordered by (source_tar, key); every row after the first is a duplicate;
- near-duplicates: distinct hash values with their first occurrence; the local path's
  multi-index scheme (``_near_pairs``: m bands by ``neardup.choose_bands``, flip patterns
  of <= d // m bits by ``explode``, a sort-merge equi-join on (band, band value), then
  ``bit_count(a ^ b) <= d``); only 8-byte values go through that join. The greedy
  "removed when within d of an earlier *kept* hash" is sequential: the close pairs (as many
  as there are near-duplicates, not rows) go to the driver, which resolves them in order as
  the local path does (at ~300 B a pair, the one driver-side cost left: ~6 GB for 20M pairs);
- MetaCLIP balancing: entry counts by ``explode`` + ``groupBy``, the same per-(sample,
  entry) draw (``balance.draw``) in a pandas UDF, kept if any entry keeps it.

The executors write the decided rows, sorted, as parquet parts; the driver streams them in
order into decisions.parquet through the writer the local path uses (``decisions_file``:
fixed row groups, so both engines give the same bytes), holding one row group at a time.
Everything is Spark SQL except the balancing draw (blake2b, a pandas UDF, run only for the
samples of entries over the cap) and the eval-overlap test (a pandas UDF, when configured).

    from data_pipeline.filter.global_spark import write_decisions_spark
    counts, rows = write_decisions_spark(per_shard_parquet_files, FilterConfig(), "work/decisions.parquet")
"""
from __future__ import annotations

import pandas as pd

from data_pipeline.filter.balance import BALANCE, BALANCE_NO_MATCH, draw
from data_pipeline.filter.config import FilterConfig
from data_pipeline.filter.neardup import _band_bounds
from data_pipeline.filter.shard_pass import KEPT, RECORD_SCHEMA

DUPLICATE_IMAGE = "filter/duplicate_image"
DUPLICATE_URL_CAPTION = "filter/duplicate_url_caption"
NEAR_DUPLICATE = "filter/near_duplicate"

_DDL = (
    "source_tar string, key string, url string, caption string, width int, height int, "
    "original_width int, original_height int, sha256 string, phash string, clip_score double, "
    "balance_entries array<string>, decision string"
)
_ORDER = ["source_tar", "key"]


def session(cfg: FilterConfig):
    """The active SparkSession, or a new one on ``cfg.global_pass.spark_master``."""
    from pyspark.sql import SparkSession

    s = SparkSession.getActiveSession()
    if s is None:
        s = (SparkSession.builder.master(cfg.global_pass.spark_master).appName("clip-filter-global-pass")
             .config("spark.ui.enabled", "false").getOrCreate())
    # toPandas through Arrow: the collect at the end is otherwise row by row in Python.
    s.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
    return s


def _mark(df, hit, reason: str):
    from pyspark.sql import functions as F

    df = df.withColumn("decision", F.when(F.col("_alive") & hit, F.lit(reason)).otherwise(F.col("decision")))
    return df.withColumn("_alive", F.col("decision") == KEPT)


def _first_wins(df, key, reason: str, only=None):
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    w = Window.partitionBy(F.col("_alive"), key).orderBy(*_ORDER)
    hit = F.row_number().over(w) > 1
    if only is not None:
        hit = hit & only
    return _mark(df, hit, reason)


def _hash64(col):
    """16 hex digits -> signed 64-bit long with the same bits."""
    from pyspark.sql import functions as F

    hi = F.conv(F.substring(col, 1, 8), 16, 10).cast("long")
    lo = F.conv(F.substring(col, 9, 8), 16, 10).cast("long")
    return F.shiftleft(hi, 32).bitwiseOR(lo)


def _near_duplicates(spark, df, d: int):
    from pyspark.sql import functions as F

    alive = df.filter("_alive").select(*_ORDER, _hash64(F.col("phash")).alias("_v"))
    distinct = alive.groupBy("_v").agg(F.min(F.struct(*_ORDER)).alias("_first")).localCheckpoint()
    gone: set[tuple[str, str]] = set()
    if d > 0:
        pairs = _near_pairs(distinct, d, distinct.count())
        # Greedy in order of the later occurrence: its earlier partners are all decided.
        rows = sorted(((tuple(r.b), tuple(r.a)) for r in pairs.toLocalIterator()))
        i = 0
        while i < len(rows):
            later, j, any_kept = rows[i][0], i, False
            while j < len(rows) and rows[j][0] == later:
                any_kept = any_kept or rows[j][1] not in gone
                j += 1
            if any_kept:
                gone.add(later)
            i = j
    first = alive.join(distinct, "_v").select(*_ORDER, "_first")
    if gone:
        g = spark.createDataFrame(sorted(gone), "gs string, gk string").select(F.struct("gs", "gk").alias("_g"))
        first = first.join(F.broadcast(g) if len(gone) < 1_000_000 else g, F.col("_first") == F.col("_g"), "left")
    else:
        first = first.withColumn("_g", F.lit(None))
    near = first.select(*_ORDER, ((F.struct(*_ORDER) != F.col("_first")) | F.col("_g").isNotNull()).alias("_near"))
    df = df.join(near, _ORDER, "left")
    return _mark(df, F.coalesce(F.col("_near"), F.lit(False)), NEAR_DUPLICATE).drop("_near")


def _near_pairs(distinct, d: int, n: int):
    """(a, b): first occurrences of two distinct hash values within distance d, a < b.

    The local path's multi-index scheme (``neardup.near_pairs``), in Spark SQL: m bands
    chosen by ``choose_bands`` for the pool size; a pair within d differs in at most
    r = d // m bits of some band, so each value looks up its band value XOR every pattern
    of <= r bits (an ``explode``, then an equi-join on (band, band value)). With m = d + 1
    bands of ~13 bits (r = 0) a million values would make ~60M candidate pairs per band;
    three 21-bit bands with one flip make ~1M.
    """
    from pyspark.sql import functions as F

    from data_pipeline.filter.neardup import _flip_patterns, choose_bands

    m = choose_bands(max(n, 2), d)
    r = d // m
    values = distinct.select("_v")
    index = query = None
    for b, (shift, width) in enumerate(_band_bounds(m)):
        # Only the 8-byte values travel through the explode and the join's shuffle; the
        # first occurrences (two strings) join back onto the few close pairs at the end.
        bv = F.shiftrightunsigned("_v", shift).bitwiseAND(F.lit((1 << width) - 1))
        i = values.select("_v", F.lit(b).alias("_b"), bv.alias("_bv"))
        pats = F.array(*[F.lit(p).cast("long") for p in _flip_patterns(width, r)])
        q = values.select("_v", F.lit(b).alias("_b"), F.explode(pats).alias("_p"), bv.alias("_bv0"))
        q = q.select("_v", "_b", F.col("_bv0").bitwiseXOR(F.col("_p")).alias("_bv"))
        index = i if index is None else index.unionByName(i)
        query = q if query is None else query.unionByName(q)
    # A sort-merge join: both sides are ~m * n rows, never something to broadcast (Spark's
    # size estimate of the checkpointed input can be small enough to try, and run out of memory).
    x, y = query.alias("x"), index.hint("merge").alias("y")
    close = (x.join(y, (F.col("x._b") == F.col("y._b")) & (F.col("x._bv") == F.col("y._bv")))
             .filter(F.col("x._v") < F.col("y._v"))
             .filter(F.bit_count(F.col("x._v").bitwiseXOR(F.col("y._v"))) <= d)
             .select(F.col("x._v").alias("_v1"), F.col("y._v").alias("_v2")).distinct())
    f1 = distinct.select(F.col("_v").alias("_v1"), F.col("_first").alias("_f1"))
    f2 = distinct.select(F.col("_v").alias("_v2"), F.col("_first").alias("_f2"))
    pairs = close.join(f1, "_v1").join(f2, "_v2")
    return pairs.select(F.least("_f1", "_f2").alias("a"), F.greatest("_f1", "_f2").alias("b"))


def _balance(df, cfg: FilterConfig):
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    b = cfg.balance
    seed = b.seed

    @pandas_udf("double")
    def draw_udf(sha: pd.Series, url: pd.Series, entry: pd.Series) -> pd.Series:
        return pd.Series([draw(seed, s, u or "", e) for s, u, e in zip(sha, url, entry)], dtype="float64")

    alive = df.filter("_alive")
    ex = alive.select(*_ORDER, "sha256", "url", F.explode(F.array_distinct("balance_entries")).alias("_e"))
    counts = ex.groupBy("_e").agg(F.count(F.lit(1)).alias("_c"))
    t = float(b.max_per_entry)
    joined = ex.join(counts, "_e")
    # The draw (Python) only where it decides: entries under the cap keep every sample.
    under = joined.filter(F.col("_c") <= F.lit(b.max_per_entry)).select(*_ORDER, F.lit(1).alias("_ke"))
    over = joined.filter(F.col("_c") > F.lit(b.max_per_entry)).select(
        *_ORDER, (draw_udf("sha256", "url", "_e") < F.lit(t) / F.col("_c")).cast("int").alias("_ke"))
    kept = under.unionByName(over).groupBy(*_ORDER).agg(F.max("_ke").alias("_k"))
    df = df.join(kept, _ORDER, "left")
    empty = F.coalesce(F.size("balance_entries"), F.lit(0)) <= 0
    keep = F.when(empty, F.lit(b.keep_unmatched)).otherwise(F.coalesce(F.col("_k"), F.lit(0)) == 1)
    df = df.withColumn("_bal", F.when(empty, F.lit(BALANCE_NO_MATCH)).otherwise(F.lit(BALANCE)))
    return _mark(df, ~keep, "_balance_").withColumn(
        "decision", F.when(F.col("decision") == "_balance_", F.col("_bal")).otherwise(F.col("decision"))
    ).drop("_k", "_bal")


def _eval_overlap(df, cfg: FilterConfig):
    """Each training hash against the (small, shipped to every task) eval set: the same
    ``eval_overlap_mask`` as the local path, per Arrow batch."""
    import numpy as np
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    from data_pipeline.filter.decontam import EVAL_OVERLAP, eval_hashes, eval_overlap_mask

    evals, d = eval_hashes(cfg.eval_overlap.eval_images), cfg.eval_overlap.max_distance

    @pandas_udf("boolean")
    def hit(phash: pd.Series) -> pd.Series:
        h = np.array([int(x, 16) if x else 0 for x in phash.fillna("")], dtype=np.uint64)
        return pd.Series(eval_overlap_mask(h, evals, d))

    return _mark(df, F.coalesce(hit(F.col("phash")), F.lit(False)), EVAL_OVERLAP)


def decide_spark_frame(files: list[str], cfg: FilterConfig):
    """The decided Spark DataFrame (RECORD_SCHEMA's columns, unordered) of the per-shard
    record files."""
    from pyspark.sql import functions as F

    spark = session(cfg)
    df = spark.read.schema(_DDL).parquet(*files)
    dup = df.groupBy(*_ORDER).count().filter("count > 1").limit(1).collect()
    if dup:
        raise ValueError(f"two per-shard records hold the same sample {[dup[0][0], dup[0][1]]}: "
                         "two input tars share a file name?")
    df = df.withColumn("_alive", F.col("decision") == KEPT)
    if cfg.eval_overlap.eval_images:
        df = _eval_overlap(df, cfg)
    if cfg.dedup.image_sha256:
        df = _first_wins(df, F.col("sha256"), DUPLICATE_IMAGE)
    if cfg.dedup.url_caption:
        # Same key as the local path; samples without a url are not url-duplicates.
        key = F.concat(F.coalesce(F.col("url"), F.lit("")), F.lit("\x00"), F.col("caption"))
        df = _first_wins(df, key, DUPLICATE_URL_CAPTION, only=F.col("url").isNotNull())
    if cfg.dedup.near_duplicates or cfg.balance.enabled:
        # The steps below read this table twice (their own sub-query, then a join back):
        # materialise it once on the executors instead of recomputing the windows.
        df = df.localCheckpoint()
    if cfg.dedup.near_duplicates:
        df = _near_duplicates(spark, df, cfg.dedup.phash_distance)
    if cfg.balance.enabled:
        df = _balance(df, cfg)
    return df.select(*RECORD_SCHEMA.names)


def write_decisions_spark(files: list[str], cfg: FilterConfig, out: str) -> tuple[dict[str, int], int]:
    """Decide on Spark and write ``out`` (decisions.parquet); returns (counts, rows).

    The executors write the decided rows, globally sorted by (source_tar, key), as parquet
    parts beside ``out`` (``orderBy`` range-partitions, so part i holds keys below part
    i + 1's); the driver then streams the parts in name order into the one file through
    ``write_decisions``, one row group at a time, and removes them."""
    import fsspec

    from data_pipeline.filter.decisions_file import write_decisions

    parts = out + ".parts"
    decide_spark_frame(files, cfg).orderBy(*_ORDER).write.mode("overwrite").parquet(parts)
    fs, root = fsspec.core.url_to_fs(parts)
    names = sorted(p for p in fs.ls(root, detail=False)
                   if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet"))
    last: list[tuple[str, str] | None] = [None]

    def batches():
        import pyarrow.parquet as pq

        for name in names:
            with fs.open(name, "rb") as f:
                for b in pq.ParquetFile(f).iter_batches(batch_size=1 << 16):
                    if b.num_rows == 0:
                        continue
                    first = (b.column("source_tar")[0].as_py(), b.column("key")[0].as_py())
                    if last[0] is not None and first < last[0]:
                        raise RuntimeError(f"Spark's sorted parts are out of order at {name}: {first} after {last[0]}")
                    last[0] = (b.column("source_tar")[-1].as_py(), b.column("key")[-1].as_py())
                    yield b

    try:
        return write_decisions(batches(), out)
    finally:
        fs.rm(root, recursive=True)

