"""Pass 2 of the filter: merge every per-shard record file and decide globally.

Over the samples that passed every per-sample rule, in (source_tar, key) order (the first
occurrence wins): exact duplicates by image SHA-256, then by (url, caption), then
near-duplicates (pHash within Hamming distance d), then MetaCLIP balancing (decontamination
against an eval set, when configured, runs first). ``global_spark`` gives the same decisions
on Spark (where the executors write the decisions and no step holds every row on the
driver). Writes ``<work_dir>/decisions.parquet`` atomically (one row per input sample, with its final
decision) and returns a ``FilterResult``.

    from data_pipeline.filter import FilterConfig, global_pass
    result = global_pass("work", FilterConfig())      # after filter_shard ran on every tar
"""
from __future__ import annotations

from dataclasses import dataclass, field

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa

from data_pipeline.filter import fsio
from data_pipeline.filter.balance import BALANCE, BALANCE_NO_MATCH, balance_keep
from data_pipeline.filter.config import FilterConfig
from data_pipeline.filter.decisions_file import read_kept, write_decisions
from data_pipeline.filter.neardup import near_duplicate_mask
from data_pipeline.filter.shard_pass import KEPT, RECORD_SCHEMA, per_shard_path

DUPLICATE_IMAGE = "filter/duplicate_image"
DUPLICATE_URL_CAPTION = "filter/duplicate_url_caption"
NEAR_DUPLICATE = "filter/near_duplicate"


@dataclass
class FilterResult:
    counts: dict[str, int]  # {"filter/<reason>": n} for every rejection
    total_in: int
    decisions_path: str
    _kept: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def kept(self) -> pd.DataFrame:
        """One row per kept sample, sorted by (source_tar, key), without "decision"; read
        from decisions.parquet on first use when the pass did not hold it (Spark)."""
        if self._kept is None:
            self._kept = read_kept(self.decisions_path)
        return self._kept

    @property
    def n_kept(self) -> int:
        return self.total_in - sum(self.counts.values())


def _per_shard_files(work_dir: str, tars: list[str] | None) -> list[str]:
    if tars is not None:
        paths = [per_shard_path(work_dir, t) for t in tars]
        missing = [p for p in paths if not fsio.exists(p)]
        if missing:
            raise FileNotFoundError(f"pass 1 has not finished for {len(missing)} tar(s), e.g. {missing[0]}")
        return paths
    fs, root = fsspec.core.url_to_fs(fsio.join(work_dir, "per_shard"))
    if not fs.exists(root):
        raise FileNotFoundError(f"no per-shard records under {work_dir}/per_shard: run pass 1 first")
    names = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith(".tmp-"))
    proto = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return [p if proto in ("file", "local") else f"{proto}://{p}" for p in names]


def first_occurrence_mask(values: pd.Series) -> np.ndarray:
    """True where the value was already seen earlier (in the frame's order)."""
    return values.duplicated(keep="first").to_numpy()


def decide(df: pd.DataFrame, cfg: FilterConfig) -> pd.Series:
    """Final decision per row of ``df`` (sorted by (source_tar, key)): the pass-1 decision,
    or a global reason, or "kept"."""
    decision = df["decision"].copy()
    alive = (decision == KEPT).to_numpy()

    def reject(mask_on_alive: np.ndarray, reason: str) -> None:
        idx = np.flatnonzero(alive)[mask_on_alive]
        decision.iloc[idx] = reason
        alive[idx] = False

    if cfg.eval_overlap.eval_images:
        from data_pipeline.filter.decontam import EVAL_OVERLAP, eval_hashes, eval_overlap_mask

        hashes = np.array([int(h, 16) for h in df.loc[alive, "phash"]], dtype=np.uint64)
        reject(eval_overlap_mask(hashes, eval_hashes(cfg.eval_overlap.eval_images), cfg.eval_overlap.max_distance),
               EVAL_OVERLAP)
    if cfg.dedup.image_sha256:
        reject(first_occurrence_mask(df.loc[alive, "sha256"]), DUPLICATE_IMAGE)
    if cfg.dedup.url_caption:
        sub = df.loc[alive]
        # Samples without a url are not url-duplicates of each other.
        dup = first_occurrence_mask(sub["url"].fillna("") + "\x00" + sub["caption"]) & sub["url"].notna().to_numpy()
        reject(dup, DUPLICATE_URL_CAPTION)
    if cfg.dedup.near_duplicates:
        hashes = np.array([int(h, 16) for h in df.loc[alive, "phash"]], dtype=np.uint64)
        reject(near_duplicate_mask(hashes, cfg.dedup.phash_distance), NEAR_DUPLICATE)
    if cfg.balance.enabled:
        sub = df.loc[alive]
        keep, no_match, _ = balance_keep(
            [list(m) for m in sub["balance_entries"]], sub["sha256"].tolist(), sub["url"].tolist(), cfg.balance
        )
        idx = np.flatnonzero(alive)
        decision.iloc[idx[~keep & no_match]] = BALANCE_NO_MATCH
        decision.iloc[idx[~keep & ~no_match]] = BALANCE
        alive[idx[~keep]] = False
    return decision


def count_rows(files: list[str]) -> int:
    """Rows in the per-shard files, from their parquet footers (no data read)."""
    import pyarrow.parquet as pq

    total = 0
    for p in files:
        with fsspec.open(p, "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def choose_engine(cfg: FilterConfig, files: list[str]) -> str:
    """"local" or "spark" for this pass (``filter.global_pass.engine``; auto: by row count)."""
    engine = cfg.global_pass.engine
    if engine != "auto":
        return engine
    if count_rows(files) < cfg.global_pass.spark_min_rows:
        return "local"
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return "local"
    return "spark"


def check_unique_keys(df: pd.DataFrame) -> None:
    dup_rows = df.duplicated(["source_tar", "key"])
    if dup_rows.any():
        first = df.loc[dup_rows, ["source_tar", "key"]].iloc[0].tolist()
        raise ValueError(f"two per-shard records hold the same sample {first}: two input tars share a file name?")


def finish(df: pd.DataFrame, work_dir: str) -> FilterResult:
    """Write decisions.parquet (df sorted by (source_tar, key), decided) and summarise."""
    out = fsio.join(work_dir, "decisions.parquet")
    counts, total = write_decisions([pa.Table.from_pandas(df, schema=RECORD_SCHEMA, preserve_index=False)], out)
    kept = df.loc[df["decision"] == KEPT].drop(columns=["decision"]).reset_index(drop=True)
    kept["balance_entries"] = kept["balance_entries"].map(list)  # numpy arrays -> plain lists
    return FilterResult(counts=counts, total_in=total, decisions_path=out, _kept=kept)


def global_pass(work_dir: str, cfg: FilterConfig, tars: list[str] | None = None) -> FilterResult:
    """Merge per-shard records (of ``tars``, or all under work_dir) and decide, in this
    process or on Spark (``cfg.global_pass.engine``)."""
    files = _per_shard_files(work_dir, tars)
    if files and choose_engine(cfg, files) == "spark":
        from data_pipeline.filter.global_spark import write_decisions_spark

        out = fsio.join(work_dir, "decisions.parquet")
        counts, total = write_decisions_spark(files, cfg, out)
        return FilterResult(counts=counts, total_in=total, decisions_path=out)
    tables = [fsio.read_parquet(p).cast(RECORD_SCHEMA) for p in files]
    table = pa.concat_tables(tables) if tables else RECORD_SCHEMA.empty_table()
    df = table.to_pandas()
    df = df.sort_values(["source_tar", "key"], kind="stable").reset_index(drop=True)
    check_unique_keys(df)
    df["decision"] = decide(df, cfg)
    return finish(df, work_dir)
