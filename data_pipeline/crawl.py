"""Crawl stage: safety-checked URL list -> img2dataset -> webdataset tars in ``OUT/crawl``.

img2dataset does the downloading (threads x processes, or the pyspark/ray distributors on a
cluster); this module only prepares its input (:mod:`data_pipeline.prepare`), calls it in
incremental mode (a rerun skips crawl shards whose ``_stats.json`` exists, so a killed
crawl continues), checks that every crawl shard finished, and turns its per-sample
status/error_message into counted reasons (:mod:`data_pipeline.crawl_counts`).

    summary = run_crawl(cfg, layout)

Distributors: ``multiprocessing`` (default, this machine), ``pyspark`` (img2dataset uses
the active SparkSession, or starts ``local[processes]``) and ``ray`` (the connected Ray
cluster). The decompression-bomb cap reaches the workers through the environment variable
``OPENCV_IO_MAX_IMAGE_PIXELS``: local workers inherit it; on a Spark cluster set
``spark.executorEnv.OPENCV_IO_MAX_IMAGE_PIXELS`` in the session (Ray: ``runtime_env``).
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

from data_pipeline import fsutil
from data_pipeline.config import BuildConfig
from data_pipeline.layout import Layout
from data_pipeline.prepare import PrepareSummary, prepare_inputs


class CrawlIncompleteError(RuntimeError):
    """Some crawl shards did not finish; rerunning the same command retries them."""


@dataclass
class CrawlPlan:
    shard_ids: list[int]
    oom_shard_count: int

    def name(self, shard_id: int) -> str:
        return f"{shard_id:0{self.oom_shard_count}d}"


def plan_crawl(prep: PrepareSummary, samples_per_shard: int) -> CrawlPlan:
    """img2dataset numbers crawl shards consecutively over its (sorted) input files."""
    n = sum(math.ceil(p / samples_per_shard) for p in prep.passed)
    return CrawlPlan(list(range(n)), max(5, len(str(max(n - 1, 0)))))


def crawl_tars(layout: Layout, plan: CrawlPlan) -> list[str]:
    return [fsutil.join(layout.crawl_dir, plan.name(i) + ".tar") for i in plan.shard_ids]


def unfinished_shards(layout: Layout, plan: CrawlPlan) -> list[int]:
    """Crawl shards without their complete set of files (stats json is written last)."""
    fs, path = fsutil.url_to_fs(layout.crawl_dir)
    present = {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)} if fs.exists(path) else set()
    return [
        i for i in plan.shard_ids
        if not {plan.name(i) + s for s in (".tar", ".parquet", "_stats.json")} <= present
    ]


def _img2dataset_env(cfg: BuildConfig) -> None:
    """Environment the crawl processes inherit (spawned children, Spark workers)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home at import
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # OpenCV reads this at load time: a PNG/JPEG declaring more pixels is refused before
    # its pixels are allocated (a decompression bomb), instead of using GBs per thread.
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(cfg.crawl.max_image_pixels)


class DistributorUnavailableError(RuntimeError):
    """The configured distributor's package is not installed."""


def _check_distributor(name: str) -> None:
    # img2dataset silently does nothing when ray is missing: fail clearly instead.
    module = {"pyspark": "pyspark", "ray": "ray"}.get(name)
    if module is None:
        return
    try:
        __import__(module)
    except ImportError as e:
        raise DistributorUnavailableError(
            f"crawl.distributor={name} needs the {module} package: pip install {module}") from e


def download(cfg: BuildConfig, layout: Layout, processes: int, oom_shard_count: int) -> None:
    """One img2dataset.download call over ``OUT/input`` (incremental: resumes)."""
    _check_distributor(cfg.crawl.distributor)
    _img2dataset_env(cfg)
    import img2dataset  # after the environment above: it imports albumentations and cv2

    c = cfg.crawl
    extra = _extra_columns(layout)
    img2dataset.download(
        url_list=layout.input_dir,
        input_format="parquet",
        url_col="url",
        caption_col="caption" if c.caption_col else None,
        save_additional_columns=extra,
        output_folder=layout.crawl_dir,
        output_format="webdataset",
        image_size=c.image_size,
        resize_mode=c.resize_mode,
        resize_only_if_bigger=c.resize_only_if_bigger,
        encode_format=c.encode_format,
        encode_quality=c.encode_quality,
        compute_hash="sha256",
        timeout=c.timeout,  # type: ignore[arg-type]  # urllib takes float seconds
        retries=c.retries,
        thread_count=c.thread_count,
        processes_count=processes,
        number_sample_per_shard=c.number_sample_per_shard,
        oom_shard_count=oom_shard_count,
        distributor=c.distributor,
        subjob_size=c.subjob_size,
        max_shard_retry=c.max_shard_retry,
        disallowed_header_directives=list(c.disallowed_header_directives),
        user_agent_token=c.user_agent_token,
        incremental_mode="incremental",
        enable_wandb=False,
        extract_exif=False,  # EXIF is not used downstream and costs time per image
    )


def _extra_columns(layout: Layout) -> list[str]:
    import pyarrow.parquet as pq

    files = fsutil.glob(fsutil.join(layout.input_dir, "*.parquet"))
    fs, path = fsutil.url_to_fs(files[0])
    with fs.open(path, "rb") as f:
        names = pq.read_schema(f).names
    return [n for n in names if n not in ("url", "caption")]  # input_row + the kept extras


@dataclass
class CrawlSummary:
    prepare: PrepareSummary
    plan: CrawlPlan
    tars: list[str]


def run_crawl(cfg: BuildConfig, layout: Layout) -> CrawlSummary:
    prep = prepare_inputs(cfg, layout)
    plan = plan_crawl(prep, cfg.crawl.number_sample_per_shard)
    if plan.shard_ids and unfinished_shards(layout, plan):
        download(cfg, layout, cfg.resolved_processes(), plan.oom_shard_count)
    missing = unfinished_shards(layout, plan)
    if missing:
        names = ", ".join(plan.name(i) for i in missing[:10])
        raise CrawlIncompleteError(
            f"{len(missing)} crawl shard(s) did not finish ({names}{', ...' if len(missing) > 10 else ''}); "
            "rerun the same command to retry them (finished shards are kept)."
        )
    return CrawlSummary(prep, plan, crawl_tars(layout, plan))
