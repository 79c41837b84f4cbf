"""Pass 1 of the filter: one input tar -> one per-shard record file (the unit of work).

Reads an img2dataset webdataset tar (key.jpg/.txt/.json), applies every per-sample rule
(decode, size, aspect ratio, caption clean-up and rules, optional CLIP score), computes the
image SHA-256 and pHash, matches balancing entries, and writes
``<work_dir>/per_shard/<tar stem>.parquet`` atomically with one row per sample (kept or
not, with its reason). A file made with the same pass-1 settings is reused as it is.

    from data_pipeline.filter import FilterConfig, filter_shard
    path = filter_shard("crawl/00000.tar", "work", FilterConfig())
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import imagehash
import pyarrow as pa

from data_pipeline.filter import caption_rules, fsio, image_rules
from data_pipeline.filter.balance import EntryMatcher, load_entries
from data_pipeline.filter.clip_score import CLIP_SCORE, ClipScorer
from data_pipeline.filter.config import FilterConfig, pass1_fingerprint
from pretrain.progress import progress

KEPT = "kept"
DUPLICATE_KEY = "filter/duplicate_key"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
FINGERPRINT_KEY = b"filter_fingerprint"

RECORD_SCHEMA = pa.schema([
    ("source_tar", pa.string()),
    ("key", pa.string()),
    ("url", pa.string()),
    ("caption", pa.string()),
    ("width", pa.int32()),  # of the stored image; -1 when it did not decode
    ("height", pa.int32()),
    ("original_width", pa.int32()),  # from img2dataset's json; -1 when absent
    ("original_height", pa.int32()),
    ("sha256", pa.string()),  # img2dataset's hash of the downloaded bytes, else of the stored bytes
    ("phash", pa.string()),  # 16 hex digits (imagehash.phash); "" when the image did not decode
    ("clip_score", pa.float64()),  # NaN when not computed
    ("balance_entries", pa.list_(pa.string())),
    ("decision", pa.string()),  # "kept" or "filter/<reason>"
])


def per_shard_path(work_dir: str, tar: str) -> str:
    return fsio.join(work_dir, "per_shard", fsio.tar_stem(tar) + ".parquet")


def _meta(parts: dict[str, bytes]) -> dict[str, Any]:
    raw = parts.get("json")
    if not raw:
        return {}
    try:
        meta = json.loads(raw.decode("utf-8", errors="replace"))
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _int(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return -1


def evaluate_sample(
    source_tar: str, key: str, parts: dict[str, bytes], cfg: FilterConfig, matcher: EntryMatcher | None
) -> tuple[dict[str, Any], Any]:
    """All per-sample rules except the CLIP score. Returns (record, decoded RGB image or None).
    The first failing rule gives the decision; hashes are computed whenever the image decodes."""
    meta = _meta(parts)
    image_bytes = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    rec: dict[str, Any] = {
        "source_tar": source_tar, "key": key,
        "url": meta.get("url") if isinstance(meta.get("url"), str) else None,
        "caption": "", "width": -1, "height": -1,
        "original_width": _int(meta.get("original_width")), "original_height": _int(meta.get("original_height")),
        "sha256": "", "phash": "", "clip_score": float("nan"), "balance_entries": [], "decision": KEPT,
    }
    sha = meta.get("sha256")
    if isinstance(sha, str) and len(sha) == 64:
        rec["sha256"] = sha.lower()
    elif image_bytes is not None:
        rec["sha256"] = hashlib.sha256(image_bytes).hexdigest()

    reasons: list[str] = []
    img, reason = image_rules.decode_image(image_bytes, cfg.image.max_pixels)
    if img is not None:
        rec["width"], rec["height"] = img.size
        rec["phash"] = str(imagehash.phash(img))
        w, h = img.size
        if cfg.image.size_source == "original" and rec["original_width"] > 0 and rec["original_height"] > 0:
            w, h = rec["original_width"], rec["original_height"]
        reason = image_rules.size_reason(w, h, cfg.image.min_side, cfg.image.max_aspect_ratio)
    if reason:
        reasons.append(reason)

    # The caption: the .txt member, else the json's caption field.
    raw_caption: bytes | str | None = parts.get("txt")
    if raw_caption is None and isinstance(meta.get("caption"), str):
        raw_caption = meta["caption"]
    text, reason = caption_rules.clean_caption(raw_caption, cfg.caption.bad_encoding, cfg.caption.fix_text)
    if text is None:
        # Keep a readable form of the rejected caption for the decisions file.
        rec["caption"] = raw_caption.decode("utf-8", "replace") if isinstance(raw_caption, bytes) else (raw_caption or "")
    else:
        rec["caption"] = text
        reason = caption_rules.caption_reason(text, cfg.caption)
        if matcher is not None:
            rec["balance_entries"] = matcher.match(text)
    if reason:
        reasons.append(reason)

    if reasons:
        rec["decision"] = reasons[0]
        img = None
    return rec, img


def _score_pending(scorer: ClipScorer, records: list[dict[str, Any]], pending: list[tuple[int, Any]], min_score: float) -> None:
    if not pending:
        return
    scores = scorer.score([im for _, im in pending], [records[i]["caption"] for i, _ in pending])
    for (i, _), s in zip(pending, scores):
        records[i]["clip_score"] = float(s)
        if s < min_score:
            records[i]["decision"] = CLIP_SCORE
    pending.clear()


def filter_shard(tar: str, work_dir: str, cfg: FilterConfig, position: int | None = None, force: bool = False) -> str:
    """Run pass 1 on one tar; returns the per-shard parquet path (reused when up to date)."""
    entries = load_entries(cfg.balance) if cfg.balance.enabled else []
    fingerprint = pass1_fingerprint(cfg, entries)
    out = per_shard_path(work_dir, tar)
    if not force and fsio.exists(out):
        try:
            done = fsio.read_parquet_metadata(out).get(FINGERPRINT_KEY, b"").decode() == fingerprint
        except Exception:  # unreadable (e.g. copied in half by hand): recompute it
            done = False
        if done:
            return out
    matcher = EntryMatcher(entries) if cfg.balance.enabled else None
    scorer = ClipScorer.from_config(cfg.clip_score) if cfg.clip_score.enabled else None

    records: list[dict[str, Any]] = []
    pending: list[tuple[int, Any]] = []  # (record index, image) awaiting a CLIP batch
    seen_keys: set[str] = set()
    repeats: list[int] = []  # records of a key already seen in this tar
    # one bar per worker on a terminal; a log gets the stage's "filter pass 1" lines only
    bar = progress(desc=f"filter {fsio.tar_stem(tar)}", unit="img", nested=True, position=position, leave=False)
    for key, parts in fsio.iter_tar_samples(tar):
        if key in seen_keys:
            # A repeated key would make the (source_tar, key) order and the shard stage's
            # lookup ambiguous: the later copy is rejected and counted.
            rec, _ = evaluate_sample(tar, key, {}, cfg, None)
            rec["decision"] = DUPLICATE_KEY
            repeats.append(len(records))
            records.append(rec)
            continue
        seen_keys.add(key)
        rec, img = evaluate_sample(tar, key, parts, cfg, matcher)
        records.append(rec)
        if scorer is not None and img is not None:
            pending.append((len(records) - 1, img))
            if len(pending) >= scorer.batch_size:
                _score_pending(scorer, records, pending, cfg.clip_score.min_score)
        bar.update(1)
    if scorer is not None:
        _score_pending(scorer, records, pending, cfg.clip_score.min_score)
    bar.close()
    # (source_tar, key) names one record everywhere after this pass (the global pass's
    # order, its uniqueness check, decisions.parquet): a repeat is renamed "key#n", n the
    # smallest not taken by a real key of this tar. It is never read back (not kept).
    taken = set(seen_keys)
    for i in repeats:
        key, n = records[i]["key"], 1
        while f"{key}#{n}" in taken:
            n += 1
        records[i]["key"] = f"{key}#{n}"
        taken.add(records[i]["key"])

    table = pa.Table.from_pylist(records, schema=RECORD_SCHEMA)
    table = table.replace_schema_metadata({FINGERPRINT_KEY: fingerprint.encode()})
    fsio.write_parquet_atomic(table, out)
    return out
