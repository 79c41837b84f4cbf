"""Pass 2 on Spark (local mode) against the single-process pass: byte-identical
decisions.parquet on synthetic metadata-only records (exact, url-caption and near
duplicates with chains, MetaCLIP balancing) and on a small real filter build.

One SparkSession for the module (start-up ~15 s on 2 cores). Skips where pyspark or Java
is missing.

Run: .venv/bin/python -m pytest -q tests/test_filter_global_spark.py   (~60 s)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_pipeline.filter import FilterConfig, global_pass
from data_pipeline.filter.fsio import write_parquet_atomic
from data_pipeline.filter.global_pass import choose_engine
from data_pipeline.filter.global_spark import sorted_files
from data_pipeline.filter.shard_pass import RECORD_SCHEMA

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def spark():
    pyspark = pytest.importorskip("pyspark")
    saved = {k: os.environ.get(k) for k in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")}
    os.environ["PYSPARK_PYTHON"] = os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    try:
        from pyspark.sql import SparkSession

        s = (SparkSession.builder.master("local[2]").appName("filter-global-test")
             .config("spark.ui.enabled", "false").config("spark.driver.memory", "1g")
             .config("spark.sql.shuffle.partitions", "4").getOrCreate())
    except Exception as e:
        pytest.skip(f"pyspark {pyspark.__version__} cannot start a local session: {e}")
    yield s
    s.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def synthetic_records(root: Path, n: int = 3000, tars: int = 3, seed: int = 0, shuffle: bool = True) -> None:
    """Per-shard record files with planted duplicates of each kind: in key order, as pass 1
    writes them (``shuffle=False``: Spark's long-order path), or shuffled inside each file
    (the general path)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**64, size=n // 4, dtype=np.uint64, endpoint=False)
    hashes = base[rng.integers(0, len(base), size=n)]
    flips = rng.integers(0, 7, size=n)
    for i in range(n):
        for b in rng.choice(64, int(flips[i]), replace=False):
            hashes[i] ^= np.uint64(1) << np.uint64(b)
    entries = ["dress", "shirt", "shoe", "bag", "hat"]
    rows = []
    for i in range(n):
        sha = f"{int(rng.integers(0, n // 2)):064x}" if rng.random() < 0.3 else f"{i + 10**6:064x}"
        url = None if rng.random() < 0.05 else f"http://127.0.0.1/{int(rng.integers(0, 20)) if rng.random() < 0.2 else i}.jpg"
        m = [e for e in entries if rng.random() < 0.3]
        rows.append({
            "source_tar": f"{i % tars:05d}.tar", "key": f"{i:09d}", "url": url,
            "caption": f"caption {int(rng.integers(0, 10)) if rng.random() < 0.5 else i}",
            "width": 224, "height": 224, "original_width": -1, "original_height": -1,
            "sha256": sha, "phash": f"{int(hashes[i]):016x}", "clip_score": float("nan"),
            "balance_entries": m, "decision": "kept" if rng.random() < 0.9 else "filter/min_side",
        })
    for t in range(tars):
        part = [r for r in rows if r["source_tar"] == f"{t:05d}.tar"]
        if shuffle:
            rng.shuffle(part)  # a per-shard file need not be in key order
        write_parquet_atomic(pa.Table.from_pylist(part, schema=RECORD_SCHEMA), str(root / "per_shard" / f"{t:05d}.parquet"))


def per_shard(work: Path) -> list[str]:
    return sorted(str(p) for p in (work / "per_shard").glob("*.parquet"))


def run_both(work: Path, cfg_dict: dict) -> tuple[bytes, bytes, dict]:
    local = global_pass(str(work), FilterConfig.from_dict({**cfg_dict, "global_pass": {"engine": "local"}}))
    a = Path(local.decisions_path).read_bytes()
    sp = global_pass(str(work), FilterConfig.from_dict({**cfg_dict, "global_pass": {"engine": "spark"}}))
    b = Path(sp.decisions_path).read_bytes()
    assert sp.counts == local.counts and sp.total_in == local.total_in
    return a, b, local.counts


@pytest.mark.timeout(300)
@pytest.mark.parametrize("shuffle", [True, False], ids=["any-order", "key-order"])
def test_spark_equals_local_on_synthetic_records(spark, tmp_path: Path, shuffle: bool) -> None:
    synthetic_records(tmp_path, shuffle=shuffle)
    assert (sorted_files(per_shard(tmp_path)) is None) == shuffle  # the path this case takes
    cfg = {"dedup": {"phash_distance": 4}, "balance": {"enabled": True, "entries": ["dress"], "max_per_entry": 200}}
    a, b, counts = run_both(tmp_path, cfg)
    assert a == b
    # every global reason happened, so each step was compared
    for reason in ("filter/duplicate_image", "filter/duplicate_url_caption", "filter/near_duplicate",
                   "filter/balance", "filter/balance_no_match"):
        assert counts.get(reason, 0) > 0, (reason, counts)


@pytest.mark.timeout(300)
def test_spark_equals_local_dedup_only_other_distance(spark, tmp_path: Path) -> None:
    synthetic_records(tmp_path, n=1500, seed=1)
    a, b, counts = run_both(tmp_path, {"dedup": {"phash_distance": 7}})
    assert a == b and counts["filter/near_duplicate"] > 0


N_AT_SCALE = 140_000  # > ROW_GROUP (131,072 rows)


@pytest.mark.timeout(600)
def test_spark_at_scale_writes_from_the_executors(spark, tmp_path: Path) -> None:
    """140k metadata-only rows (the benchmark's generator; more than one parquet row group) with
    the driver allowed only 4 MB of task results in all: the decided rows (~35 MB) must go to disk
    from the executors, not
    through the driver; the file assembled from Spark's parts equals the local one byte for
    byte, in whole row groups, and the parts are gone."""
    import pyarrow.parquet as pq

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.bench_global_pass import make_records
    from data_pipeline.filter.decisions_file import ROW_GROUP

    make_records(tmp_path, N_AT_SCALE, per_file=N_AT_SCALE // 4)
    local = global_pass(str(tmp_path), FilterConfig.from_dict({"global_pass": {"engine": "local"}}))
    a = Path(local.decisions_path).read_bytes()
    conf = spark.sparkContext._jsc.sc().conf()  # the live SparkConf: read by every new task set
    saved = conf.get("spark.driver.maxResultSize", "1g")
    conf.set("spark.driver.maxResultSize", "4m")
    try:
        sp = global_pass(str(tmp_path), FilterConfig.from_dict({"global_pass": {"engine": "spark"}}))
    finally:
        conf.set("spark.driver.maxResultSize", saved)
    assert Path(sp.decisions_path).read_bytes() == a
    assert sp.counts == local.counts and sp.total_in == N_AT_SCALE and sp.n_kept == len(local.kept)
    assert sp.counts["filter/near_duplicate"] > 100 and sp.counts["filter/duplicate_image"] > 1000
    md = pq.ParquetFile(sp.decisions_path).metadata
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [ROW_GROUP, N_AT_SCALE - ROW_GROUP]
    assert not Path(sp.decisions_path + ".parts").exists()
    assert sp.kept.equals(local.kept)  # read back from the file, as the shard stage gets it


def test_auto_engine_by_row_count(tmp_path: Path) -> None:
    synthetic_records(tmp_path, n=200)
    files = sorted(str(p) for p in (tmp_path / "per_shard").glob("*.parquet"))
    assert choose_engine(FilterConfig(), files) == "local"
    assert choose_engine(FilterConfig.from_dict({"global_pass": {"spark_min_rows": 200}}), files) == "spark"
    assert choose_engine(FilterConfig.from_dict({"global_pass": {"spark_min_rows": 201}}), files) == "local"
    with pytest.raises(ValueError, match="global_pass.engine"):
        FilterConfig.from_dict({"global_pass": {"engine": "dask"}})


@pytest.mark.timeout(300)
def test_spark_equals_local_on_a_real_filter_build(spark, tmp_path: Path) -> None:
    from data_pipeline.filter import filter_stage
    from test_filter_stage import build_dataset

    from test_filter_support import distinct_indices, encode, real_image

    tars, expected = build_dataset(tmp_path)
    work = tmp_path / "work"
    filter_stage(tars, str(work), FilterConfig.from_dict({"global_pass": {"engine": "local"}}))
    a, b, counts = run_both(work, {})
    assert a == b
    assert counts["filter/near_duplicate"] == 2 and counts["filter/duplicate_image"] == 2
    # decontamination: an eval set holding a re-encode of one kept picture (d[4])
    evals = tmp_path / "eval"
    evals.mkdir()
    (evals / "a.jpg").write_bytes(encode(real_image(distinct_indices(16)[4]), quality=70))
    a, b, counts = run_both(work, {"eval_overlap": {"eval_images": str(evals)}})
    assert a == b and counts["filter/eval_overlap"] == 1


@pytest.mark.timeout(300)
def test_spark_equals_local_on_a_tar_with_a_repeated_key(spark, tmp_path: Path) -> None:
    from data_pipeline.filter import filter_stage
    from test_filter_stage import repeated_key_tar

    tar, _ = repeated_key_tar(tmp_path)
    work = tmp_path / "work"
    filter_stage([tar], str(work), FilterConfig.from_dict({"global_pass": {"engine": "local"}}))
    assert sorted_files(per_shard(work)) is None  # "a#2" after "b": the any-order path
    a, b, counts = run_both(work, {})
    assert a == b and counts == {"filter/duplicate_key": 2}


def test_engine_is_not_part_of_the_dataset_identity() -> None:
    from data_pipeline.config import dataset_identity, load_config

    a = load_config(overrides=[("filter.global_pass.engine", "local")])
    b = load_config(overrides=[("filter.global_pass.engine", "spark"), ("filter.global_pass.spark_min_rows", 5)])
    assert a.filter.global_pass.engine == "local" and b.filter.global_pass.engine == "spark"
    assert dataset_identity(a) == dataset_identity(b)


def _records(path: Path, rows: list[tuple[str, str]], decisions: list[str] | None = None, group: int | None = None,
             base: int = 0) -> str:
    """A per-shard file of ``rows`` (source_tar, key), all distinct (image hash i + base)."""
    import pyarrow.parquet as pq

    n = len(rows)
    t = pa.Table.from_pylist([{
        "source_tar": st, "key": k, "url": f"http://127.0.0.1/{i}.jpg", "caption": f"c{i}", "width": 224,
        "height": 224, "original_width": -1, "original_height": -1, "sha256": f"{i + base:064x}",
        "phash": f"{(i + base) * 0x9E3779B97F4A7C15 % 2**64:016x}", "clip_score": float("nan"), "balance_entries": [],
        "decision": (decisions or ["kept"] * n)[i]} for i, (st, k) in enumerate(rows)], schema=RECORD_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, str(path), row_group_size=group)
    return str(path)


def test_sorted_files_orders_files_or_refuses(tmp_path: Path) -> None:
    a = _records(tmp_path / "x" / "00001.parquet", [("00001.tar", "001"), ("00001.tar", "002")])
    b = _records(tmp_path / "x" / "00000.parquet", [("00000.tar", "009"), ("00000.tar", "010")])
    empty = _records(tmp_path / "x" / "00002.parquet", [])
    assert sorted_files([a, empty, b]) == [b, a, empty]  # by their rows, empty files last
    unsorted = _records(tmp_path / "u" / "00003.parquet", [("00003.tar", "002"), ("00003.tar", "001")])
    repeated = _records(tmp_path / "r" / "00003.parquet", [("00003.tar", "001"), ("00003.tar", "001")])
    overlap = _records(tmp_path / "o" / "00004.parquet", [("00000.tar", "005"), ("00000.tar", "011")])
    same_name = _records(tmp_path / "y" / "00001.parquet", [("00009.tar", "001")])
    assert sorted_files([a, b, unsorted]) is None
    assert sorted_files([a, b, repeated]) is None
    assert sorted_files([a, b, overlap]) is None  # rows of b's range in another file
    assert sorted_files([a, b, same_name]) is None  # _metadata.file_name could not tell them apart
    # the order check runs across row groups (batches) too
    across = _records(tmp_path / "g" / "00005.parquet", [("00005.tar", f"{i:03d}") for i in (0, 1, 3, 2)], group=2)
    assert sorted_files([across]) is None


@pytest.mark.timeout(300)
def test_spark_row_index_survives_skipped_row_groups(spark, tmp_path: Path) -> None:
    """Key-ordered files whose first row groups hold no kept row (Parquet statistics let
    Spark skip them when it filters on decision): ``_metadata.row_index`` must still count
    the skipped rows, or a rejection lands on the wrong row. Byte-identical to local, with
    duplicates placed after the skipped groups."""
    n = 1200
    for t in range(2):
        rows = [(f"{t:05d}.tar", f"{i:06d}") for i in range(n)]
        dec = ["filter/min_side"] * 500 + ["kept"] * (n - 500)
        _records(tmp_path / "per_shard" / f"{t:05d}.parquet", rows, dec, group=100, base=t * n)
    import pyarrow.parquet as pq

    # plant exact duplicates, both after skipped groups: file 1's rows 700 and 900 repeat
    # the images of file 0's rows 600 and 1000
    p = tmp_path / "per_shard" / "00001.parquet"
    t1 = pq.read_table(p)
    sha = t1.column("sha256").to_pylist()
    sha[700] = f"{600:064x}"
    sha[900] = f"{1000:064x}"
    pq.write_table(t1.set_column(t1.schema.get_field_index("sha256"), "sha256", pa.array(sha)), str(p), row_group_size=100)
    assert sorted_files(per_shard(tmp_path)) is not None
    a, b, counts = run_both(tmp_path, {})
    assert a == b and counts["filter/duplicate_image"] == 2 and counts["filter/min_side"] == 1000
