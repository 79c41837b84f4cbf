"""Filter stage of the data build: keep a crawled sample only if it passes every rule,
and count every rejection by reason.

    from data_pipeline.filter import FilterConfig, filter_stage
    result = filter_stage(tars, work_dir, FilterConfig(), processes=4)
    result.kept      # DataFrame, sorted by (source_tar, key): source_tar, key, url, caption,
                     # width, height, original_width, original_height, sha256, phash,
                     # clip_score, balance_entries
    result.counts    # {"filter/<reason>": n};  sum(counts) + len(kept) == total_in
    result.total_in

Pass 1 (``filter_shard``, one task per tar, parallel; ``python -m
data_pipeline.filter.worker --tar T --work-dir W`` as a separate job) writes
``W/per_shard/<tar stem>.parquet``; pass 2 (``global_pass``) merges them and writes
``W/decisions.parquet``. Both are atomic and a rerun reuses finished per-shard files.

Reasons, in the order the rules run (a sample gets the first that fails):
pass 1 — filter/missing_image, filter/empty_image, filter/not_an_image,
filter/decompression_bomb, filter/corrupt_image (truncated or bad pixel data),
filter/min_side, filter/aspect_ratio, then the caption: filter/caption_encoding,
filter/caption_empty, filter/caption_filename, filter/caption_generic, filter/caption_url,
filter/caption_repetitive, filter/caption_too_short, filter/caption_too_long,
filter/caption_too_few_words, filter/caption_too_many_words, then filter/clip_score
(optional) and filter/duplicate_key (a key repeated inside one tar);
pass 2 (over pass-1 survivors, first in (source_tar, key) order wins; in this process or on
Spark, ``filter.global_pass.engine``) — filter/eval_overlap (optional decontamination),
filter/duplicate_image (SHA-256), filter/duplicate_url_caption, filter/near_duplicate
(pHash), filter/balance and filter/balance_no_match (optional).
"""
from __future__ import annotations

# Bump when the per-shard record's meaning changes: older per-shard files are recomputed.
RECORD_VERSION = 2  # 2: a key repeated in one tar is renamed key#n (unique records)

from data_pipeline.filter.config import (  # noqa: E402
    BalanceConfig, CaptionRules, ClipScoreConfig, DedupConfig, EvalOverlapConfig, FilterConfig, GlobalPassConfig,
    ImageRules,
)
from data_pipeline.filter.global_pass import FilterResult, global_pass  # noqa: E402
from data_pipeline.filter.shard_pass import filter_shard, per_shard_path  # noqa: E402
from data_pipeline.filter.stage import filter_stage  # noqa: E402

__all__ = [
    "BalanceConfig", "CaptionRules", "ClipScoreConfig", "DedupConfig", "EvalOverlapConfig", "FilterConfig",
    "FilterResult", "GlobalPassConfig",
    "ImageRules", "RECORD_VERSION", "filter_shard", "filter_stage", "global_pass", "per_shard_path",
]
