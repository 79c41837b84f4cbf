"""The filter stage on one machine: pass 1 over every tar in a spawn process pool, then
the global pass.

    from data_pipeline.filter import FilterConfig, filter_stage
    result = filter_stage(["crawl/00000.tar", "crawl/00001.tar"], "work", FilterConfig(), processes=4)
    result.kept, result.counts, result.total_in
"""
from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor, as_completed

from data_pipeline.filter import fsio
from data_pipeline.filter.config import FilterConfig
from data_pipeline.filter.global_pass import FilterResult, global_pass
from data_pipeline.filter.shard_pass import filter_shard
from pretrain.progress import progress


def _check_names(input_tars: list[str]) -> None:
    seen: dict[str, str] = {}
    for t in input_tars:
        stem = fsio.tar_stem(t)
        if stem in seen and seen[stem] != t:
            raise ValueError(f"input tars {seen[stem]!r} and {t!r} share the name {stem!r}: their per-shard records would collide")
        seen[stem] = t


def _init_worker(threads: int) -> None:
    # Before torch (CLIP score) is imported: N workers x all cores each would oversubscribe.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))


def filter_stage(input_tars: list[str], work_dir: str, cfg: FilterConfig, processes: int = 1) -> FilterResult:
    """Pass 1 (one task per tar; finished ones are reused) then pass 2 (global decisions).

    The result does not depend on ``processes`` or on the order of ``input_tars``.
    """
    tars = sorted(dict.fromkeys(input_tars))
    for t in tars:
        if not fsio.exists(t):
            raise FileNotFoundError(f"filter input tar not found: {t}")
    _check_names(tars)
    fsio.makedirs(fsio.join(work_dir, "per_shard"))
    bar = progress(total=len(tars), desc="filter pass 1", unit="tar")
    if processes <= 1 or len(tars) <= 1:
        for t in tars:
            filter_shard(t, work_dir, cfg)
            bar.update(1)
    else:
        # spawn: safe with threads (torch, img2dataset) and identical on every OS.
        ctx = mp.get_context("spawn")
        workers = min(processes, len(tars))
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(threads,)) as ex:
            futures = {ex.submit(filter_shard, t, work_dir, cfg, i % processes + 1): t for i, t in enumerate(tars)}
            for fut in as_completed(futures):
                try:
                    fut.result()
                except Exception as e:
                    # Finished tars keep their records (a rerun resumes); queued ones are dropped.
                    ex.shutdown(wait=True, cancel_futures=True)
                    raise RuntimeError(f"filter pass 1 failed on {futures[fut]}: {e}") from e
                bar.update(1)
    bar.close()
    # Every task has finished: a temporary file left now is a killed run's debris.
    fsio.remove_temporaries(fsio.join(work_dir, "per_shard"))
    return global_pass(work_dir, cfg, tars)
