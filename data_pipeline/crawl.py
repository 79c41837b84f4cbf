"""Crawl stage: safety-checked URL list -> img2dataset -> webdataset tars in ``OUT/crawl``.

img2dataset does the downloading (threads x processes, or the pyspark/ray distributors on a
cluster): this module prepares its input (:mod:`data_pipeline.prepare`), runs its reader,
writer and distributors with the crawl's own shard downloader
(:mod:`data_pipeline.crawl_worker`: the crawl's fetcher, :mod:`data_pipeline.fetch`, in
place of img2dataset's per-URL function, and a watchdog per shard), skips crawl shards
whose ``_stats.json`` exists (a killed crawl continues), checks that every crawl shard
finished, and turns each sample's status/error_message into a counted reason
(:mod:`data_pipeline.crawl_counts`). ``--retry-failed`` adds a round of the transient
failures (:mod:`data_pipeline.retry_failed`).

    summary = run_crawl(cfg, layout)
    summary = run_crawl(cfg, layout, retry_failed=True)

Every fetch goes through the crawl's egress proxy (:mod:`data_pipeline.egress`), started
for the duration of ``img2dataset.download``: the address policy of the URL check
(:mod:`data_pipeline.safety`) is enforced again at connect time for every connection and
redirect hop, unresolvable names are refused, bodies are capped and each connection has
an overall deadline, and the per-host limits hold (:mod:`data_pipeline.politeness`). Its
counts by reason are saved in ``OUT/crawl/egress.json`` (summed over reruns) and reported
by the stats stage. Config keys (``crawl.`` section):

  download_deadline  seconds one connection (one download or redirect hop) may take in
                     all (default 60); ``timeout`` stays the per-socket-operation limit
  max_body_bytes     largest response body accepted (default 32 MiB)
  egress_bind        address the proxy listens on (default 127.0.0.1)
  egress_port        its port (default 0: a free one)
  egress_advertise   address workers use to reach it (default: egress_bind)
  retries, backoff_s, max_retry_after_s      transient failures (:mod:`data_pipeline.fetch`)
  host_max_connections, host_rate, host_wait_s   per-host politeness
  shard_deadline, shard_grace_s, max_shard_retry the shard watchdog

Distributors: ``multiprocessing`` (default, this machine), ``pyspark`` (img2dataset uses
the active SparkSession, or starts ``local[processes]``) and ``ray`` (the connected Ray
cluster). The workers' environment (the proxy variables ``http_proxy``/``https_proxy``/
``ftp_proxy`` with ``no_proxy`` cleared, ``NO_ALBUMENTATIONS_UPDATE=1`` and the
decompression-bomb cap ``OPENCV_IO_MAX_IMAGE_PIXELS``) reaches them as follows:
multiprocessing children and a SparkSession that img2dataset starts inherit this
process's environment; an active SparkSession gets it in ``SparkContext.environment``,
which pyspark ships with every task to the Python workers (local mode and clusters
alike); Ray tasks get it as ``runtime_env={"env_vars": ...}``. On a cluster whose
executors run on other machines, bind the proxy where they can reach it
(``crawl.egress_bind=0.0.0.0 crawl.egress_advertise=<this host's address>``, a firewall
letting only the executors in); all their traffic then passes through this machine. A
user who sets ``spark.executorEnv.http_proxy`` etc. themselves is overridden for the
crawl's tasks, never bypassed.
"""
from __future__ import annotations

import math
import os
import sys
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from data_pipeline import fsutil
from data_pipeline.config import BuildConfig
from data_pipeline.crawl_output import crawl_output
from data_pipeline.egress import EgressProxy
from data_pipeline.layout import Layout
from data_pipeline.politeness import queue_seconds
from data_pipeline.prepare import PrepareSummary, address_policy, prepare_inputs
from data_pipeline.retry_failed import RetryRound, load_rounds, plan_retry_round
from data_pipeline.safety import AddressPolicy, Resolver, resolve_host

EGRESS_COUNTS = "egress.json"
WATCHDOG_SUFFIX = "_watchdog.json"  # NNNNN_watchdog.json: the shard watchdog's kills of that shard


class CrawlIncompleteError(RuntimeError):
    """Some crawl shards did not finish; rerunning the same command retries them."""


@dataclass
class CrawlPlan:
    shard_ids: list[int]
    oom_shard_count: int

    def name(self, shard_id: int) -> str:
        return f"{shard_id:0{self.oom_shard_count}d}"


def plan_crawl(prep: PrepareSummary, samples_per_shard: int, rounds: list[RetryRound] | None = None) -> CrawlPlan:
    """img2dataset numbers crawl shards consecutively over its (sorted) input files; the
    ``--retry-failed`` rounds' shards follow. Names keep the first crawl's width."""
    n = sum(math.ceil(p / samples_per_shard) for p in prep.passed)
    total = n + sum(r.shards for r in rounds or [])
    return CrawlPlan(list(range(total)), max(5, len(str(max(n - 1, 0)))))


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


def worker_env(cfg: BuildConfig, proxy: EgressProxy) -> dict[str, str]:
    """What every crawl worker must run with, whatever the distributor."""
    return {
        "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations phones home at import
        # OpenCV reads this at load time: a PNG/JPEG declaring more pixels is refused before
        # its pixels are allocated (a decompression bomb), instead of using GBs per thread.
        "OPENCV_IO_MAX_IMAGE_PIXELS": str(cfg.crawl.max_image_pixels),
        **proxy.worker_env(cfg.crawl.egress_advertise),
    }


@contextmanager
def _patched(mapping: dict[str, str | None], env: dict[str, str]) -> Iterator[None]:
    saved = {k: mapping.get(k) for k in env}
    mapping.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                mapping.pop(k, None)
            else:
                mapping[k] = v


@contextmanager
def _spark_env(env: dict[str, str]) -> Iterator[None]:
    """An active session's executors get ``env`` with every task (pyspark ships
    ``SparkContext.environment`` with each Python function); without one, img2dataset starts
    a local session, which inherits this process's environment."""
    from pyspark.sql import SparkSession

    spark = SparkSession.getActiveSession()
    if spark is None:
        yield
        return
    with _patched(spark.sparkContext.environment, env):
        yield


@contextmanager
def _ray_env(env: dict[str, str]) -> Iterator[None]:
    """img2dataset submits its module-level remote function; give it a runtime_env."""
    from img2dataset import distributor

    original = distributor.ray_download
    distributor.ray_download = original.options(runtime_env={"env_vars": env})
    try:
        yield
    finally:
        distributor.ray_download = original


@contextmanager
def crawl_environment(cfg: BuildConfig, proxy: EgressProxy) -> Iterator[dict[str, str]]:
    """The worker environment in place for the duration of the crawl (restored after)."""
    env = worker_env(cfg, proxy)
    with ExitStack() as stack:
        stack.enter_context(_patched(os.environ, {  # type: ignore[arg-type]
            **env, **{k: os.environ.get(k, v) for k, v in (
                ("WANDB_MODE", "disabled"), ("WANDB_SILENT", "true"), ("PYSPARK_PYTHON", sys.executable))}}))
        if cfg.crawl.distributor == "pyspark":
            stack.enter_context(_spark_env(env))
        elif cfg.crawl.distributor == "ray":
            stack.enter_context(_ray_env(env))
        yield env


def load_egress_counts(layout: Layout) -> dict[str, int]:
    """The egress proxy's counts by reason, summed over the crawl runs of this output."""
    path = fsutil.join(layout.crawl_dir, EGRESS_COUNTS)
    return dict(fsutil.read_json(path)["counts"]) if fsutil.exists(path) else {}


def load_watchdog_kills(layout: Layout) -> int:
    """How many times the shard watchdog killed a stuck crawl process (:mod:`data_pipeline.crawl_worker`)."""
    return sum(int(fsutil.read_json(p)["kills"]) for p in fsutil.glob(fsutil.join(layout.crawl_dir, "*" + WATCHDOG_SUFFIX)))


def _save_egress_counts(layout: Layout, counts: dict[str, int]) -> None:
    total = Counter(load_egress_counts(layout))
    total.update(counts)
    fsutil.write_json(fsutil.join(layout.crawl_dir, EGRESS_COUNTS), {"counts": dict(sorted(total.items()))})


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


@dataclass
class CrawlInput:
    """One img2dataset input (a directory of parquet files, or one file), its crawl shards
    numbered from ``first_shard``."""
    url_list: str
    first_shard: int


def crawl_inputs(layout: Layout, rounds: list[RetryRound]) -> list[CrawlInput]:
    return [CrawlInput(layout.input_dir, 0)] + [CrawlInput(r.file, r.first_shard) for r in rounds]


def download(cfg: BuildConfig, layout: Layout, processes: int, oom_shard_count: int,
             policy: AddressPolicy | None = None, resolver: Resolver = resolve_host,
             inputs: list[CrawlInput] | None = None, total_urls: int = 0) -> dict[str, int]:
    """Crawl ``inputs`` (default: ``OUT/input``) with img2dataset's reader, writer and
    distributors, shard by shard under the watchdog (:mod:`data_pipeline.crawl_worker`),
    every fetch through the egress proxy; finished crawl shards are skipped (a rerun
    resumes). Returns the proxy's counts (also added to ``egress.json``).
    Progress: the proxy's request count out of `total_urls` (:mod:`data_pipeline.crawl_output`)."""
    _check_distributor(cfg.crawl.distributor)
    c = cfg.crawl
    extra = _extra_columns(layout)
    proxy = EgressProxy(policy or address_policy(cfg), resolver=resolver, max_body_bytes=c.max_body_bytes,
                        deadline=c.download_deadline, host=c.egress_bind, port=c.egress_port,
                        host_max_connections=c.host_max_connections, host_rate=c.host_rate,
                        host_queue_s=queue_seconds(c.timeout))
    with proxy, crawl_environment(cfg, proxy), crawl_output(
            layout.crawl_dir, total_urls, lambda: sum(proxy.counts().get(k, 0) for k in ("requests", "tunnels"))):
        _run_img2dataset(cfg, layout, processes, oom_shard_count, extra,
                         inputs or [CrawlInput(layout.input_dir, 0)])
    counts = proxy.counts()
    fsutil.makedirs(layout.crawl_dir)
    _save_egress_counts(layout, counts)
    return counts


def _absolute(url: str) -> str:
    fs, path = fsutil.url_to_fs(url)
    return os.path.abspath(path) if fsutil.is_local(fs) else url


def _run_img2dataset(cfg: BuildConfig, layout: Layout, processes: int, oom_shard_count: int,
                     extra: list[str], inputs: list[CrawlInput]) -> None:
    """What ``img2dataset.download`` does, with our downloader (the crawl's fetcher and the
    watchdog) and the first shard id of each input chosen by us (a retry round's shards
    follow all earlier ones)."""
    # Inside the crawl environment: these import cv2 (reads the pixel cap).
    from img2dataset import distributor
    from img2dataset.reader import Reader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    from data_pipeline.crawl_worker import CrawlDownloader
    from data_pipeline.fetch import FetchSettings

    c = cfg.crawl
    out = _absolute(layout.crawl_dir)
    fsutil.makedirs(out)
    tmp = fsutil.join(out, "_tmp")
    fsutil.makedirs(tmp)
    done = {int(p.rsplit("/", 1)[-1].split("_")[0]) for p in fsutil.glob(fsutil.join(out, "*_stats.json"))}
    resizer = Resizer(image_size=c.image_size, resize_mode=c.resize_mode, resize_only_if_bigger=c.resize_only_if_bigger,
                      encode_quality=c.encode_quality, encode_format=c.encode_format)
    run = {"multiprocessing": distributor.multiprocessing_distributor, "pyspark": distributor.pyspark_distributor,
           "ray": distributor.ray_distributor}[c.distributor]
    caption = "caption" if c.caption_col else None
    for inp in inputs:
        reader = Reader(_absolute(inp.url_list), "parquet", "url", caption, None, None, extra,
                        c.number_sample_per_shard, done, tmp, inp.first_shard)
        downloader = CrawlDownloader(
            fetch=FetchSettings.from_config(c), shard_deadline=c.shard_deadline, grace_s=c.shard_grace_s,
            max_shard_retry=c.max_shard_retry,
            sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=c.thread_count,
            save_caption=caption is not None,
            extract_exif=False,  # EXIF is not used downstream and costs time per image
            output_folder=out, column_list=reader.column_list, timeout=c.timeout,
            number_sample_per_shard=c.number_sample_per_shard, oom_shard_count=oom_shard_count,
            compute_hash="sha256", verify_hash_type=None, encode_format=c.encode_format, retries=c.retries,
            user_agent_token=c.user_agent_token or c.user_agent,
            disallowed_header_directives=list(c.disallowed_header_directives))
        # The watchdog retries a shard itself; the distributor's retry is for a worker that died.
        run(processes, downloader, reader, c.subjob_size, c.max_shard_retry)
    fs, path = fsutil.url_to_fs(tmp)
    if fs.exists(path):
        fs.rm(path, recursive=True)


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
    egress: dict[str, int] = field(default_factory=dict)  # this run's proxy counts


def run_crawl(cfg: BuildConfig, layout: Layout, resolver: Resolver = resolve_host,
              retry_failed: bool = False) -> CrawlSummary:
    """Prepare + crawl. ``resolver`` (host, port) -> addresses is used by the URL check and
    the egress proxy alike (tests give one that answers like a rebinding DNS server).
    ``retry_failed``: once the crawl is complete, crawl its transient failures again as a
    new round (:mod:`data_pipeline.retry_failed`)."""
    policy = address_policy(cfg)
    prep = prepare_inputs(cfg, layout, policy=policy, resolver=resolver)
    sps = cfg.crawl.number_sample_per_shard
    rounds = load_rounds(layout)
    plan = plan_crawl(prep, sps, rounds)
    egress: dict[str, int] = {}
    if plan.shard_ids and unfinished_shards(layout, plan):
        egress = download(cfg, layout, cfg.resolved_processes(), plan.oom_shard_count, policy, resolver,
                          crawl_inputs(layout, rounds), total_urls=sum(prep.passed))
    if retry_failed and plan.shard_ids and not unfinished_shards(layout, plan):
        new = plan_retry_round(layout, [plan.name(i) for i in plan.shard_ids], len(plan.shard_ids), sps)
        if new is not None:
            rounds.append(new)
            plan = plan_crawl(prep, sps, rounds)
            counts = download(cfg, layout, cfg.resolved_processes(), plan.oom_shard_count, policy, resolver,
                              [CrawlInput(new.file, new.first_shard)])
            egress = dict(Counter(egress) + Counter(counts))
    missing = unfinished_shards(layout, plan)
    if missing:
        names = ", ".join(plan.name(i) for i in missing[:10])
        raise CrawlIncompleteError(
            f"{len(missing)} crawl shard(s) did not finish ({names}{', ...' if len(missing) > 10 else ''}); "
            "rerun the same command to retry them (finished shards are kept)."
        )
    return CrawlSummary(prep, plan, crawl_tars(layout, plan), egress)
