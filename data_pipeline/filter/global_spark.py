"""Pass 2 of the filter on Spark: the same decisions as ``global_pass.decide``, row for row.

First occurrence is the smallest (source_tar, key) (Spark compares strings by UTF-8 bytes,
which is code-point order, as pandas sorts). The steps run on a narrow table: only the rows
pass 1 kept, only the columns a step reads, and an order column ``_o`` that increases with
(source_tar, key):

- sorted input (what pass 1 of the data build writes; the driver checks every file's
  (source_tar, key) column before Spark starts): ``_o`` is a long, the file's rank in that
  order shifted left 40 bits plus the row's index in the file (Spark's ``_metadata.row_index``),
  so no step shuffles a string to order rows and no full row is ever shuffled;
- any other input: ``_o`` is the (source_tar, key) struct, and the decided rows are joined
  back onto the full rows and sorted by Spark.

Each step, over the rows still alive:

- exact duplicates (image SHA-256, then (url, caption)): ``row_number()`` over a window per
  value, ordered by ``_o``; every row after the first is a duplicate;
- near-duplicates: distinct hash values with their first occurrence; pigeonhole blocks
  (``_near_pairs``: d + 1 blocks of the 64 bits, each value shuffled once per block, keyed
  by its bits there), and in each partition the local path's vectorised search per group
  of one key, on its other bits (``neardup.block_pairs``), in a ``mapInPandas`` task; only
  (block, value) rows are shuffled. The greedy "removed when within d of an earlier
  *kept* hash" is sequential: the close pairs
  (as many as there are near-duplicates, not rows) go to the driver, which resolves them in
  order as the local path does;
- MetaCLIP balancing: entry counts by ``explode`` + ``groupBy``, the same per-(sample,
  entry) draw (``balance.draw``) in a pandas UDF, kept if any entry keeps it.

Output: the executors write the rejected rows' (``_o``, reason), sorted, as parquet parts
beside ``out``; the driver streams the input files in order (sorted input) or Spark's sorted
full rows (other input) into decisions.parquet through the writer the local path uses
(``decisions_file``: fixed row groups, so both engines give the same bytes), holding one row
group at a time. Everything is Spark SQL except the balancing draw (blake2b, a pandas UDF,
run only for the samples of entries over the cap) and the eval-overlap test (a pandas UDF,
when configured).

    from data_pipeline.filter.global_spark import write_decisions_spark
    counts, rows = write_decisions_spark(per_shard_parquet_files, FilterConfig(), "work/decisions.parquet")
"""
from __future__ import annotations

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

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
_ROW_BITS = 40  # rows per file below 2**40; ranks below 2**23
_BATCH = 1 << 16


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


def _columns(cfg: FilterConfig) -> list[str]:
    """The record columns the global steps read."""
    cols = ["phash"] if cfg.eval_overlap.eval_images or cfg.dedup.near_duplicates else []
    if cfg.dedup.image_sha256 or cfg.balance.enabled:
        cols.append("sha256")
    if cfg.dedup.url_caption or cfg.balance.enabled:
        cols.append("url")
    if cfg.dedup.url_caption:
        cols.append("caption")
    if cfg.balance.enabled:
        cols.append("balance_entries")
    return cols


def _mark(df, hit, reason: str):
    from pyspark.sql import functions as F

    df = df.withColumn("decision", F.when(F.col("_alive") & hit, F.lit(reason)).otherwise(F.col("decision")))
    return df.withColumn("_alive", F.col("decision") == KEPT)


def _first_wins(df, key, reason: str, only=None):
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    w = Window.partitionBy(F.col("_alive"), key).orderBy("_o")
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
    from pyspark.sql.types import StructField, StructType

    o_type = df.schema["_o"].dataType
    long_o = not isinstance(o_type, StructType)
    alive = df.filter("_alive").select("_o", _hash64(F.col("phash")).alias("_v"))
    distinct = alive.groupBy("_v").agg(F.min("_o").alias("_first")).localCheckpoint()
    gone: list = []
    if d > 0:
        pairs = _near_pairs(distinct, d)
        if long_o:  # Arrow to numpy: 16 bytes a pair on the driver, not two Python ints and a Row
            p = pairs.toPandas()
            a, b = p["a"].to_numpy(np.int64), p["b"].to_numpy(np.int64)
            s = np.lexsort((a, b))
            gone = _greedy(b[s].tolist(), a[s].tolist())
        else:
            rows = sorted((tuple(r.b), tuple(r.a)) for r in pairs.toLocalIterator())
            gone = _greedy([r[0] for r in rows], [r[1] for r in rows])
    first = alive.join(distinct, "_v").select("_o", "_first")
    if gone:
        schema = StructType([StructField("_g", o_type)])
        g = (spark.createDataFrame(pd.DataFrame({"_g": np.asarray(gone, np.int64)}), schema) if long_o
             else spark.createDataFrame([(v,) for v in gone], schema))
        first = first.join(F.broadcast(g) if len(gone) < 1_000_000 else g, F.col("_first") == F.col("_g"), "left")
    else:
        first = first.withColumn("_g", F.lit(None))
    near = first.select("_o", ((F.col("_o") != F.col("_first")) | F.col("_g").isNotNull()).alias("_near"))
    df = df.join(near, "_o", "left")
    return _mark(df, F.coalesce(F.col("_near"), F.lit(False)), NEAR_DUPLICATE).drop("_near")


def _greedy(later: list, earlier: list) -> list:
    """Later occurrences dropped: pairs sorted by (later, earlier), taken in that order.

    A later occurrence goes when any of its earlier partners stays; every earlier partner
    sorts before it, so its fate is already known (the local path's rule, same order).
    """
    gone: set = set()
    out: list = []
    cur, hit = None, False
    for b, a in zip(later, earlier):
        if b != cur:
            if hit:
                gone.add(cur)
                out.append(cur)
            cur, hit = b, False
        hit = hit or a not in gone
    if hit:
        gone.add(cur)
        out.append(cur)
    return out


def _near_pairs(distinct, d: int):
    """(a, b): first occurrences of two distinct hash values within distance d, a < b.

    Pigeonhole over d + 1 blocks of the 64 bits: two values within d agree exactly on at
    least one block, so each value goes out once per block, keyed by (block, its bits there),
    and any two that share a key meet in one partition. Each partition then searches each
    group of one key on the other bits (``neardup.block_pairs``: the local path's vectorised
    multi-index search, per group, in a ``mapInPandas`` task), so the shuffle carries d + 1
    12-byte rows a value and a task's work grows with the square of a group (~N / 2**13
    values), not of its partition (~5N / partitions): at 100M rows the one-search-per-
    partition form spent over an hour in this step. (The SQL form, an ``explode`` of every
    flip pattern and an equi-join, carried ~70 rows a value at d = 4 and took ~10x longer at
    1M rows.) A pair found in two blocks is kept once.
    """
    from pyspark.sql import functions as F

    bounds = _band_bounds(d + 1)
    blocks = None
    for b, (shift, width) in enumerate(bounds):
        bv = F.shiftrightunsigned("_v", shift).bitwiseAND(F.lit((1 << width) - 1))
        rows = distinct.select("_v", F.lit(b).alias("_b"), bv.alias("_bv"))
        blocks = rows if blocks is None else blocks.unionByName(rows)

    def find(frames):
        from data_pipeline.filter.neardup import block_pairs

        frames = [f for f in frames if len(f)]
        if not frames:
            return
        f = pd.concat(frames, ignore_index=True)
        blk, v = f["_b"].to_numpy(np.int64), f["_v"].to_numpy(np.int64).view(np.uint64)
        for b in np.unique(blk):
            shift, width = bounds[int(b)]
            p = block_pairs(v[blk == b], shift, width, d).view(np.int64)
            for c in range(0, len(p), 1 << 20):  # as signed longs, smaller first: one form a pair
                q = p[c:c + (1 << 20)]
                yield pd.DataFrame({"_v1": q.min(axis=1), "_v2": q.max(axis=1)})

    close = (blocks.repartition("_b", "_bv").select("_b", "_v")
             .mapInPandas(find, "_v1 long, _v2 long").distinct())
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
    ex = alive.select("_o", "sha256", "url", F.explode(F.array_distinct("balance_entries")).alias("_e"))
    counts = ex.groupBy("_e").agg(F.count(F.lit(1)).alias("_c"))
    t = float(b.max_per_entry)
    joined = ex.join(counts, "_e")
    # The draw (Python) only where it decides: entries under the cap keep every sample.
    under = joined.filter(F.col("_c") <= F.lit(b.max_per_entry)).select("_o", F.lit(1).alias("_ke"))
    over = joined.filter(F.col("_c") > F.lit(b.max_per_entry)).select(
        "_o", (draw_udf("sha256", "url", "_e") < F.lit(t) / F.col("_c")).cast("int").alias("_ke"))
    kept = under.unionByName(over).groupBy("_o").agg(F.max("_ke").alias("_k"))
    df = df.join(kept, "_o", "left")
    empty = F.coalesce(F.size("balance_entries"), F.lit(0)) <= 0
    keep = F.when(empty, F.lit(b.keep_unmatched)).otherwise(F.coalesce(F.col("_k"), F.lit(0)) == 1)
    df = df.withColumn("_bal", F.when(empty, F.lit(BALANCE_NO_MATCH)).otherwise(F.lit(BALANCE)))
    return _mark(df, ~keep, "_balance_").withColumn(
        "decision", F.when(F.col("decision") == "_balance_", F.col("_bal")).otherwise(F.col("decision"))
    ).drop("_k", "_bal")


def _eval_overlap(df, cfg: FilterConfig):
    """Each training hash against the (small, shipped to every task) eval set: the same
    ``eval_overlap_mask`` as the local path, per Arrow batch."""
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    from data_pipeline.filter.decontam import EVAL_OVERLAP, eval_hashes, eval_overlap_mask

    evals, d = eval_hashes(cfg.eval_overlap.eval_images), cfg.eval_overlap.max_distance

    @pandas_udf("boolean")
    def hit(phash: pd.Series) -> pd.Series:
        h = np.array([int(x, 16) if x else 0 for x in phash.fillna("")], dtype=np.uint64)
        return pd.Series(eval_overlap_mask(h, evals, d))

    return _mark(df, F.coalesce(hit(F.col("phash")), F.lit(False)), EVAL_OVERLAP)


def rejections(spark, kept, cfg: FilterConfig):
    """(``_o``, decision) of the rows a global step rejects, from ``kept``: the rows pass 1
    kept, with ``_o`` (unique, increasing in first-occurrence order) and ``_columns(cfg)``."""
    from pyspark.sql import functions as F

    df = kept.withColumn("decision", F.lit(KEPT)).withColumn("_alive", F.lit(True))
    if cfg.eval_overlap.eval_images:
        df = _eval_overlap(df, cfg)
    if cfg.dedup.image_sha256:
        df = _first_wins(df, F.col("sha256"), DUPLICATE_IMAGE)
    if cfg.dedup.url_caption:
        # Same key as the local path; samples without a url are not url-duplicates.
        key = F.concat(F.coalesce(F.col("url"), F.lit("")), F.lit("\x00"), F.col("caption"))
        df = _first_wins(df, key, DUPLICATE_URL_CAPTION, only=F.col("url").isNotNull())
    later = [c for c in ("phash", "sha256", "url", "balance_entries")
             if (c == "phash" and cfg.dedup.near_duplicates) or (c != "phash" and cfg.balance.enabled)]
    if cfg.dedup.near_duplicates or cfg.balance.enabled:
        # The steps below read this table twice (their own sub-query, then a join back):
        # materialise it once on the executors, with only what they read, instead of
        # recomputing the windows.
        df = df.select("_o", "decision", "_alive", *later).localCheckpoint()
    if cfg.dedup.near_duplicates:
        df = _near_duplicates(spark, df, cfg.dedup.phash_distance)
    if cfg.balance.enabled:
        df = _balance(df, cfg)
    return df.filter(~F.col("_alive")).select("_o", "decision")


def sorted_files(files: list[str]) -> list[str] | None:
    """``files`` in the order in which their rows run strictly increasing by (source_tar,
    key), or None when there is none (a file out of order inside, files that overlap, a
    null, or two files of one name, which Spark's ``_metadata.file_name`` would confuse).
    Reads only those two columns, a batch at a time."""
    names = [f.rstrip("/").rsplit("/", 1)[-1] for f in files]
    if len(set(names)) != len(names):
        return None
    spans, empty = [], []
    for f in files:
        first = last = None
        with fsspec.open(f, "rb") as fh:
            pf = pq.ParquetFile(fh)
            if pf.metadata.num_rows >= 1 << _ROW_BITS:
                return None
            for b in pf.iter_batches(batch_size=_BATCH, columns=_ORDER):
                n = b.num_rows
                if n == 0:
                    continue
                st, k = b.column(0).cast(pa.string()), b.column(1).cast(pa.string())
                if st.null_count or k.null_count:
                    return None
                if n > 1:
                    s0, s1, k0, k1 = st.slice(0, n - 1), st.slice(1), k.slice(0, n - 1), k.slice(1)
                    up = pc.or_(pc.greater(s1, s0), pc.and_(pc.equal(s1, s0), pc.greater(k1, k0)))
                    if not pc.all(up).as_py():
                        return None
                head, tail = (st[0].as_py(), k[0].as_py()), (st[n - 1].as_py(), k[n - 1].as_py())
                if last is not None and head <= last:
                    return None
                first, last = first or head, tail
        (empty.append(f) if first is None else spans.append((first, last, f)))
    spans.sort()
    if any(a[1] >= b[0] for a, b in zip(spans, spans[1:])) or len(spans) >= 1 << (63 - _ROW_BITS):
        return None
    return [f for _, _, f in spans] + empty


class _Rejections:
    """The sorted (``_o``, decision) parts, read forward a batch at a time."""

    def __init__(self, fs, names: list[str]):
        self._batches = self._read(fs, names)
        self._o = np.zeros(0, np.int64)
        self._d = pa.array([], pa.string())
        self._last = -1

    @staticmethod
    def _read(fs, names):
        for name in names:
            with fs.open(name, "rb") as f:
                for b in pq.ParquetFile(f).iter_batches(batch_size=_BATCH, columns=["_o", "decision"]):
                    yield b.column(0).to_numpy(), b.column(1).cast(pa.string())

    def below(self, hi: int) -> tuple[np.ndarray, pa.Array]:
        """The next rejections with ``_o`` < hi, in order."""
        while not len(self._o) or self._o[-1] < hi:
            nxt = next(self._batches, None)
            if nxt is None:
                break
            o, d = nxt
            if len(o) and (o[0] <= self._last or np.any(np.diff(o) <= 0)):
                raise RuntimeError("Spark's sorted rejections are out of order")
            if len(o):
                self._last = int(o[-1])
            self._o, self._d = np.concatenate([self._o, o]), pa.concat_arrays([self._d, d])
        k = int(np.searchsorted(self._o, hi))
        o, d = self._o[:k], self._d.slice(0, k)
        self._o, self._d = self._o[k:], self._d.slice(k)
        return o, d

    def left(self) -> int:
        return len(self._o) + sum(len(o) for o, _ in self._batches)


def _write_sorted_input(order: list[str], cfg: FilterConfig, out: str) -> tuple[dict[str, int], int]:
    from pyspark.sql import functions as F

    from data_pipeline.filter.decisions_file import write_decisions

    spark = session(cfg)
    ranks = spark.createDataFrame([(f.rstrip("/").rsplit("/", 1)[-1], i) for i, f in enumerate(order)],
                                  "_fname string, _rank long")
    df = spark.read.schema(_DDL).parquet(*order).select(
        "*", F.col("_metadata.file_name").alias("_fname"), F.col("_metadata.row_index").alias("_row"))
    df = df.join(F.broadcast(ranks), "_fname", "left")
    o = F.when(F.col("_rank").isNull(), F.raise_error(F.concat(F.lit("no rank for per-shard file "), F.col("_fname"))))
    o = o.otherwise(F.shiftleft(F.col("_rank"), _ROW_BITS).bitwiseOR(F.col("_row")))
    kept = df.filter(F.col("decision") == KEPT).select(o.alias("_o"), *_columns(cfg))
    parts = out + ".parts"
    rejections(spark, kept, cfg).orderBy("_o").write.mode("overwrite").parquet(parts)
    fs, root = fsspec.core.url_to_fs(parts)
    rej = _Rejections(fs, sorted(p for p in fs.ls(root, detail=False)
                                 if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet")))

    def batches():
        # The input again, file by file in order, with the rejected rows' decisions put in.
        for rank, name in enumerate(order):
            row = rank << _ROW_BITS
            with fsspec.open(name, "rb") as fh:
                for b in pq.ParquetFile(fh).iter_batches(batch_size=_BATCH):
                    o, d = rej.below(row + b.num_rows)
                    if len(o):
                        if o[0] < row:
                            raise RuntimeError(f"a rejection for no row of the input (before {name})")
                        i = b.schema.get_field_index("decision")
                        dec = b.column(i).cast(pa.string())
                        pos = pa.array(o - row)
                        if not pc.all(pc.equal(pc.take(dec, pos), KEPT)).as_py():
                            raise RuntimeError(f"Spark rejected a row pass 1 had not kept, in {name}: the input changed?")
                        mask = np.zeros(b.num_rows, bool)
                        mask[o - row] = True
                        b = b.set_column(i, "decision", pc.replace_with_mask(dec, pa.array(mask), d))
                    yield b
                    row += b.num_rows
        if rej.left():
            raise RuntimeError("rejections for rows past the end of the input: the input changed?")

    try:
        return write_decisions(batches(), out)
    finally:
        fs.rm(root, recursive=True)


def _write_any_input(files: list[str], cfg: FilterConfig, out: str) -> tuple[dict[str, int], int]:
    from pyspark.sql import functions as F

    spark = session(cfg)
    df = spark.read.schema(_DDL).parquet(*files)
    dup = df.groupBy(*_ORDER).count().filter("count > 1").limit(1).collect()
    if dup:
        raise ValueError(f"two per-shard records hold the same sample {[dup[0][0], dup[0][1]]}: "
                         "two input tars share a file name?")
    kept = df.filter(F.col("decision") == KEPT).select(F.struct(*_ORDER).alias("_o"), *_columns(cfg))
    rej = rejections(spark, kept, cfg).select(
        F.col("_o.source_tar").alias("source_tar"), F.col("_o.key").alias("key"), F.col("decision").alias("_d"))
    full = df.join(rej, _ORDER, "left").withColumn("decision", F.coalesce("_d", "decision"))
    parts = out + ".parts"
    full.select(*RECORD_SCHEMA.names).orderBy(*_ORDER).write.mode("overwrite").parquet(parts)
    return _stream_sorted_parts(parts, out)


def _stream_sorted_parts(parts: str, out: str) -> tuple[dict[str, int], int]:
    """Spark's parts of full decided rows (``orderBy`` range-partitions, so part i holds
    keys below part i + 1's), in name order into ``out``; removes them."""
    from data_pipeline.filter.decisions_file import write_decisions

    fs, root = fsspec.core.url_to_fs(parts)
    names = sorted(p for p in fs.ls(root, detail=False)
                   if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet"))
    last: list[tuple[str, str] | None] = [None]

    def batches():
        for name in names:
            with fs.open(name, "rb") as f:
                for b in pq.ParquetFile(f).iter_batches(batch_size=_BATCH):
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


def write_decisions_spark(files: list[str], cfg: FilterConfig, out: str) -> tuple[dict[str, int], int]:
    """Decide on Spark and write ``out`` (decisions.parquet); returns (counts, rows)."""
    order = sorted_files(files)
    if order is None:
        return _write_any_input(files, cfg, out)
    return _write_sorted_input(order, cfg, out)
