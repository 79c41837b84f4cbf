"""The data build's stages as functions: crawl -> filter -> shard -> stats, and build (all).

Each stage takes the output directory's lock first (one build per directory at a time: a
second one stops with an error naming the holder; local and network-mounted directories only,
see pretrain.fs), binds it to this dataset (a directory holding another dataset is a clear
error), reuses whatever an earlier (possibly killed) run finished, and
records its duration under ``OUT/timings``.

    from data_pipeline.config import load_config
    from data_pipeline.pipeline import build
    stats = build(load_config(None, [("urls", "urls.parquet"), ("output", "out/")]))
"""
from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

from data_pipeline import fsutil
from data_pipeline.config import BuildConfig, config_dict, dataset_identity
from data_pipeline.crawl import (
    CrawlPlan, crawl_tars, load_egress_counts, load_watchdog_kills, plan_crawl, run_crawl, unfinished_shards,
)
from data_pipeline.crawl_counts import crawl_accounting
from data_pipeline.filter_run import FilterOutcome, load_filter_outcome, run_filter
from data_pipeline.inputs import list_input_files
from data_pipeline.layout import Layout, OutputInUseError, bind_output, input_fingerprint
from data_pipeline.manifest import build_manifest
from data_pipeline.prepare import PrepareSummary, load_prepared
from data_pipeline.retry_failed import load_rounds
from data_pipeline.shard import load_crawl_meta, run_shard
from data_pipeline.stats import compute_stats, stats_markdown, summary_table
from data_pipeline.stats_chart import CHART_NAME, reject_chart_png
from pretrain.fs import DirBusyError, lock_dir, unlock_dir
from pretrain.redact import redact_tree

F = TypeVar("F", bound=Callable[..., Any])


class StageOrderError(RuntimeError):
    """A stage was run before the stage it reads from finished."""


def _layout(cfg: BuildConfig) -> Layout:
    if not cfg.output:
        raise StageOrderError("no output directory given: pass --output DIR")
    return Layout(cfg.output.rstrip("/"))


def owned(stage: F) -> F:
    """Run ``stage`` holding the output directory's lock (re-entrant: `build` holds it across
    its stages), so no second build sweeps or overwrites this one's files meanwhile."""
    @functools.wraps(stage)
    def run(cfg: BuildConfig, *args: Any, **kwargs: Any) -> Any:
        root = _layout(cfg).root
        try:
            locked = lock_dir(root, f"data build ({stage.__name__})")
        except DirBusyError as e:
            raise OutputInUseError(str(e)) from None
        try:
            return stage(cfg, *args, **kwargs)
        finally:
            if locked:
                unlock_dir(root)
    return run  # type: ignore[return-value]


def bind(cfg: BuildConfig, with_input: bool) -> Layout:
    """Check/record the dataset this output holds (the URL list's bytes are part of it)."""
    layout = _layout(cfg)
    # Credentials in URLs (a presigned URL list) are no part of what the dataset is (the
    # list's bytes are, below), and the identity goes into the shared manifest.json.
    identity = redact_tree(dataset_identity(cfg))
    if with_input:
        files, _ = list_input_files(cfg.urls, cfg.crawl.input_format)
        identity["input_sha256"] = input_fingerprint(files)
    elif fsutil.exists(layout.build_config):
        identity["input_sha256"] = fsutil.read_json(layout.build_config)["identity"].get("input_sha256")
    else:
        raise StageOrderError(f"{layout.root} holds no data build yet: run `crawl` or `build` first")
    bind_output(layout, identity, config_dict(cfg))
    return layout


@contextmanager
def timed(layout: Layout, stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    fsutil.write_json(layout.timing(stage), {"seconds": round(time.perf_counter() - t0, 3)})


@owned
def crawl(cfg: BuildConfig, retry_failed: bool = False) -> None:
    """``retry_failed``: also crawl the transient failures of the finished crawl again, into
    new crawl shards (:mod:`data_pipeline.retry_failed`); filter and shard then run again."""
    layout = bind(cfg, with_input=True)
    with timed(layout, "crawl"):
        run_crawl(cfg, layout, retry_failed=retry_failed)


def _finished_crawl(cfg: BuildConfig, layout: Layout) -> tuple[PrepareSummary, CrawlPlan]:
    prep = load_prepared(layout)
    if not prep.files:
        raise StageOrderError(f"no crawl in {layout.root}: run `crawl` (or `build`) first")
    plan = plan_crawl(prep, cfg.crawl.number_sample_per_shard, load_rounds(layout))
    if unfinished_shards(layout, plan):
        raise StageOrderError(f"the crawl in {layout.root} is not finished: rerun `crawl` to complete it")
    return prep, plan


@owned
def filter(cfg: BuildConfig) -> FilterOutcome:  # noqa: A001 - the stage's name
    layout = bind(cfg, with_input=False)
    _, plan = _finished_crawl(cfg, layout)
    with timed(layout, "filter"):
        return run_filter(cfg, layout, crawl_tars(layout, plan))


@owned
def shard(cfg: BuildConfig) -> dict[str, Any]:
    layout = bind(cfg, with_input=False)
    outcome = load_filter_outcome(layout)
    if outcome is None:
        raise StageOrderError(f"no filter result in {layout.root}: run `filter` (or `build`) first")
    with timed(layout, "shard"):
        shards = run_shard(cfg, layout, outcome.kept)
        identity = fsutil.read_json(layout.build_config)["identity"]  # includes the URL list's sha256
        manifest = build_manifest(shards, identity, cfg.shard.samples_per_shard)
        fsutil.write_json(layout.manifest, manifest)
    return manifest


@owned
def stats(cfg: BuildConfig, echo: bool = True) -> dict[str, Any]:
    """Re-derive stats.json + stats.md from what the stages left in the output dir."""
    layout = bind(cfg, with_input=False)
    prep, plan = _finished_crawl(cfg, layout)
    crawl_counts, successes = crawl_accounting(layout, [plan.name(i) for i in plan.shard_ids], sum(prep.passed))
    outcome = load_filter_outcome(layout)
    if outcome is None or not fsutil.exists(layout.manifest):
        raise StageOrderError(f"{layout.root} has no finished shards yet: run `build` (or filter + shard)")
    counts = dict(prep.counts)
    for src in (crawl_counts, outcome.counts):
        for k, v in src.items():
            counts[k] = counts.get(k, 0) + v
    if outcome.total_in != successes:
        # The filter saw a different number of samples than the crawl produced.
        counts["filter/unaccounted_input"] = successes - outcome.total_in
    meta_df = load_crawl_meta(layout, outcome.kept["source_tar"].tolist())
    meta = dict(zip(meta_df.index, meta_df.to_dict("records")))
    timings = {}
    for stage in ("crawl", "filter", "shard"):
        if fsutil.exists(layout.timing(stage)):
            timings[stage] = fsutil.read_json(layout.timing(stage))["seconds"]
    shards = fsutil.read_json(layout.manifest)["shards"]
    result = compute_stats(prep.rows, counts, outcome.kept, meta, shards, timings, load_egress_counts(layout),
                           load_watchdog_kills(layout))
    fsutil.write_json(layout.stats_json, result)
    chart = layout.path(CHART_NAME)
    fsutil.write_bytes(chart, reject_chart_png(result))
    fsutil.write_text(layout.stats_md, stats_markdown(result, chart=CHART_NAME))
    if echo:
        print(summary_table(result), flush=True)
        if result["unaccounted"]:
            print(f"WARNING: {result['unaccounted']} input rows are not accounted for", flush=True)
    return result


@owned
def build(cfg: BuildConfig, echo: bool = True, retry_failed: bool = False) -> dict[str, Any]:
    crawl(cfg, retry_failed=retry_failed)
    filter(cfg)
    shard(cfg)
    return stats(cfg, echo=echo)
