"""Throughput and peak memory of the filter's global pass (pass 2), single process vs Spark.

Writes synthetic metadata-only per-shard records (what pass 1 leaves: no images) of N rows
(100k rows per file; 10 % exact image duplicates, 5 % url+caption repeats, 5 % near-duplicate
pHashes: N/150 pictures with ~7.5 copies each at 0-4 flipped bits, so the close pairs grow
linearly with N; random hashes otherwise), then runs ``global_pass`` with
``filter.global_pass.engine=local`` and ``=spark`` (Spark local[*] unless --master), each in
its own child process. Peak memory is the summed resident set of the child's process tree
(Python + the Spark JVM), sampled every 0.2 s. Prints one markdown row per (N, engine).

    .venv/bin/python benchmarks/bench_global_pass.py --rows 1000000              # both engines
    .venv/bin/python benchmarks/bench_global_pass.py --rows 100000000 --engines spark \\
        --spark-memory 20g --work /big/disk/gp                                    # 100M, one command
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_records(work: Path, n: int, per_file: int = 100_000, seed: int = 0) -> None:
    from data_pipeline.filter.fsio import write_parquet_atomic
    from data_pipeline.filter.shard_pass import RECORD_SCHEMA

    rng = np.random.default_rng(seed)
    for f, start in enumerate(range(0, n, per_file)):
        m = min(per_file, n - start)
        idx = np.arange(start, start + m)
        sha_id = np.where(rng.random(m) < 0.10, rng.integers(0, max(1, n // 10), m), idx + n)
        url_id = np.where(rng.random(m) < 0.05, rng.integers(0, max(1, n // 20), m), idx + n)
        cap_id = np.where(url_id < n, 0, idx)
        h = rng.integers(0, 2**64, size=m, dtype=np.uint64, endpoint=False)
        near = rng.random(m) < 0.05
        # A fixed number of pictures would grow the copies per picture, and so the pairs, as N^2.
        pics = max(1, n // 150)
        h[near] = (rng.integers(0, pics, size=int(near.sum()), dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        for k in range(4):  # 1-4 bit flips on the planted ones
            flip = near & (rng.random(m) < 0.6)
            h[flip] ^= np.uint64(1) << rng.integers(0, 64, int(flip.sum())).astype(np.uint64)
        table = pa.table({
            "source_tar": pa.array([f"{f:06d}.tar"] * m),
            "key": pa.array([f"{i:011d}" for i in idx]),
            "url": pa.array([f"https://example.org/{u}.jpg" for u in url_id]),
            "caption": pa.array([f"a photo of item {c}" for c in cap_id]),
            "width": pa.array(np.full(m, 256, np.int32)), "height": pa.array(np.full(m, 256, np.int32)),
            "original_width": pa.array(np.full(m, -1, np.int32)), "original_height": pa.array(np.full(m, -1, np.int32)),
            "sha256": pa.array([f"{s:064x}" for s in sha_id]),
            "phash": pa.array([f"{int(v):016x}" for v in h]),
            "clip_score": pa.array(np.full(m, np.nan)),
            "balance_entries": pa.array([[] for _ in range(m)], pa.list_(pa.string())),
            "decision": pa.array(["kept"] * m),
        }, schema=RECORD_SCHEMA)
        write_parquet_atomic(table, str(work / "per_shard" / f"{f:06d}.parquet"))


def child(engine: str, work: str, master: str, memory: str) -> None:
    from data_pipeline.filter import FilterConfig, global_pass

    if engine == "spark":
        from pyspark.sql import SparkSession

        os.environ["PYSPARK_PYTHON"] = os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
        (SparkSession.builder.master(master).config("spark.ui.enabled", "false")
         .config("spark.driver.memory", memory).config("spark.sql.shuffle.partitions", "64").getOrCreate())
    cfg = FilterConfig.from_dict({"global_pass": {"engine": engine}})
    t0 = time.perf_counter()
    r = global_pass(work, cfg)
    print(json.dumps({"seconds": time.perf_counter() - t0, "rows": r.total_in, "counts": r.counts}))


def measure(engine: str, work: Path, master: str, memory: str) -> dict:
    import psutil

    p = subprocess.Popen([sys.executable, __file__, "--_child", engine, "--work", str(work), "--master", master,
                          "--spark-memory", memory], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    proc, peak = psutil.Process(p.pid), 0
    while p.poll() is None:
        try:
            rss = sum(q.memory_info().rss for q in [proc, *proc.children(recursive=True)])
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    out = p.stdout.read().strip().splitlines()
    if p.returncode != 0 or not out:
        raise SystemExit(f"{engine} child failed (rc {p.returncode})")
    res = json.loads(out[-1])
    res["peak_gib"] = peak / 2**30
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--engines", nargs="+", default=["local", "spark"])
    ap.add_argument("--master", default="local[*]")
    ap.add_argument("--spark-memory", default="8g", help="spark.driver.memory (local mode: the executors too)")
    ap.add_argument("--work", default="", help="where the records go (default: a temporary dir, removed)")
    ap.add_argument("--_child", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        return child(a._child, a.work, a.master, a.spark_memory)
    print(f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} cores")
    print("| rows | engine | seconds | rows/s | peak RSS (GiB) | duplicates removed |")
    print("|---|---|---|---|---|---|")
    for n in a.rows:
        work = Path(a.work) / f"gp_{n}" if a.work else Path(tempfile.mkdtemp(prefix="gp_bench_"))
        if not (work / "per_shard").exists():
            make_records(work, n)
        for engine in a.engines:
            (work / "decisions.parquet").unlink(missing_ok=True)
            r = measure(engine, work, a.master, a.spark_memory)
            removed = sum(v for k, v in r["counts"].items())
            print(f"| {n:,} | {engine} | {r['seconds']:.1f} | {n / r['seconds']:,.0f} | {r['peak_gib']:.2f} | {removed:,} |",
                  flush=True)
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
