"""Shard stage: write the kept samples into fixed-size webdataset tars + their manifest.

Samples come out in the filter's output order, ``shard.samples_per_shard`` per tar (the
last one partial), named ``shards/00000.tar`` ... Each sample has ``jpg`` (RGB JPEG: the
crawl's bytes when they already are one, else re-encoded), ``txt`` (the cleaned caption)
and ``json`` (url, caption, sizes, sha256, filter scores, the source row's extra columns).
Tars are byte-deterministic (:mod:`data_pipeline.tario`) and written atomically, so a
rerun skips finished ones and rebuilds the rest identically.

    shards = run_shard(cfg, layout, kept)   # [{"path": "shards/00000.tar", "num_samples": n, "sha256": ...}]
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from data_pipeline import fsutil
from data_pipeline.config import BuildConfig
from data_pipeline.layout import Layout
from pretrain.progress import progress
from pretrain.shards.tario import TarIndex, tar_bytes

# Columns of the kept table written as-is into the json's top level; others are scores.
_BASE = {"source_tar", "key", "url", "caption", "width", "height", "sha256"}
# img2dataset's own per-sample columns (not extra input columns).
_CRAWL_OWN = {"key", "url", "caption", "status", "error_message", "width", "height",
              "original_width", "original_height", "sha256", "exif", "md5", "sha512", "input_row"}


def load_crawl_meta(layout: Layout, tar_names: list[str]) -> pd.DataFrame:
    """img2dataset's rows for the successful samples of the given crawl tars, indexed by
    (tar name, key): original sizes, input_row and the extra input columns."""
    frames = []
    for name in sorted(set(tar_names)):
        fs, path = fsutil.url_to_fs(fsutil.join(layout.crawl_dir, name[: -len(".tar")] + ".parquet"))
        with fs.open(path, "rb") as f:
            df = pq.read_table(f).to_pandas()
        df = df[df["status"] == "success"].copy()
        df["source_tar"] = name
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["source_tar", "key"]).set_index(["source_tar", "key"])
    return pd.concat(frames, ignore_index=True).set_index(["source_tar", "key"])


def _plain(v: Any) -> Any:
    """A JSON-safe Python value (numpy scalars/arrays, NaN -> null, bytes -> hex)."""
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if v is pd.NaT or v is None:
        return None
    if isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def as_rgb_jpeg(data: bytes, quality: int) -> tuple[bytes, int, int]:
    """(RGB JPEG bytes, width, height): the input unchanged when it already is one."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG" and img.mode == "RGB":
            return data, img.width, img.height
        img.load()
        if img.mode in ("RGBA", "LA", "P") and ("A" in img.getbands() or "transparency" in img.info):
            rgba = img.convert("RGBA")
            rgb = Image.new("RGB", rgba.size, (255, 255, 255))
            rgb.paste(rgba, mask=rgba.getchannel("A"))  # transparent -> white, like img2dataset
        else:
            rgb = img.convert("RGB")
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=quality)
        return out.getvalue(), rgb.width, rgb.height


def sample_json(row: dict[str, Any], meta: dict[str, Any], out_key: str, width: int, height: int) -> dict[str, Any]:
    doc = {k: _plain(v) for k, v in row.items() if k not in _BASE}  # filter scores
    doc.update({
        "key": out_key,
        "url": _plain(row["url"]),
        "caption": _plain(row["caption"]),
        "width": width,
        "height": height,
        "original_width": _plain(meta.get("original_width")),
        "original_height": _plain(meta.get("original_height")),
        "sha256": _plain(row["sha256"]),
        "source": {"crawl_tar": row["source_tar"], "crawl_key": row["key"], "input_row": _plain(meta.get("input_row"))},
        "extra": {k: _plain(v) for k, v in sorted(meta.items()) if k not in _CRAWL_OWN},
    })
    return doc


def shard_name(i: int, digits: int) -> str:
    return f"shards/{i:0{digits}d}.tar"


def _build_one(rows: list[dict[str, Any]], first_index: int, key_digits: int, metas: dict[tuple[str, str], dict],
               indexes: dict[str, TarIndex], encode_format: str, quality: int) -> bytes:
    samples = []
    for j, row in enumerate(rows):
        tar, key = row["source_tar"], row["key"]
        raw = indexes[tar].read(f"{key}.{encode_format}")
        jpg, w, h = as_rgb_jpeg(raw, quality)
        meta = metas.get((tar, key), {})
        out_key = f"{first_index + j:0{key_digits}d}"
        doc = sample_json(row, meta, out_key, w, h)
        text = json.dumps(doc, sort_keys=True, ensure_ascii=False, allow_nan=False).encode("utf-8")
        samples.append((out_key, {"jpg": jpg, "txt": str(row["caption"]).encode("utf-8"), "json": text}))
    return tar_bytes(samples)


def run_shard(cfg: BuildConfig, layout: Layout, kept: pd.DataFrame) -> list[dict[str, Any]]:
    s = cfg.shard
    n = len(kept)
    n_shards = math.ceil(n / s.samples_per_shard)
    key_digits = max(9, len(str(max(n - 1, 0))))
    fsutil.makedirs(layout.shards_dir)
    fsutil.remove_stale_tmp(layout.shards_dir)
    rows = kept.to_dict("records")
    meta_df = load_crawl_meta(layout, [r["source_tar"] for r in rows])
    metas = dict(zip(meta_df.index, meta_df.to_dict("records")))
    indexes = {t: TarIndex(fsutil.join(layout.crawl_dir, t)) for t in sorted({r["source_tar"] for r in rows})}

    def one(i: int) -> dict[str, Any]:
        rel = shard_name(i, s.name_digits)
        url = layout.path(rel)
        lo, hi = i * s.samples_per_shard, min(n, (i + 1) * s.samples_per_shard)
        if fsutil.exists(url):  # finished by an earlier run (written atomically)
            data = fsutil.read_bytes(url)
        else:
            data = _build_one(rows[lo:hi], lo, key_digits, metas, indexes, cfg.crawl.encode_format, s.jpeg_quality)
            fsutil.write_bytes(url, data)
        return {"path": rel, "num_samples": hi - lo, "sha256": hashlib.sha256(data).hexdigest()}

    with ThreadPoolExecutor(max(1, cfg.resolved_processes())) as pool:
        return list(progress(pool.map(one, range(n_shards)), total=n_shards, desc="shard: write tars", unit="tar"))
