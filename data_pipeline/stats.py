"""``stats.json`` + ``stats.md`` of a data build, and the summary table printed at the end.

Counts per stage and reason for every URL of the list (they add up: rows in = kept +
rejected, any gap is reported as ``unaccounted``), caption-length and image-size
histograms of the kept samples, and the stage durations. ``egress`` holds the crawl's
egress proxy counts (:mod:`data_pipeline.egress`): per connection, so a URL whose
redirect was refused counts once there per hop, and a body cut mid-way (counted per URL
as ``download/truncated``) shows there with its cause (``safety/body_too_large``,
``safety/deadline``). ``watchdog_kills`` counts the crawl processes the shard watchdog
killed (:mod:`data_pipeline.crawl_worker`; their shards were retried).

    stats = compute_stats(rows_in, counts, kept, meta, shards, timings, egress, watchdog_kills)
    print(summary_table(stats)); write_text(path, stats_markdown(stats, chart="stats_rejects.png"))

The bar chart of the reject reasons is drawn by :mod:`data_pipeline.stats_chart`.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

CAPTION_CHAR_EDGES = [0, 10, 20, 40, 80, 160, 320, 640, 1280]
CAPTION_WORD_EDGES = [0, 1, 2, 4, 8, 16, 32, 64, 128]
SIDE_EDGES = [0, 32, 64, 128, 200, 256, 384, 512, 1024, 2048]


def histogram(values: list[float] | np.ndarray, edges: list[int]) -> dict[str, Any]:
    """Counts in [e_i, e_{i+1}) with an open last bin, as {"edges": [...], "counts": [...]}."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    bins = np.searchsorted(np.asarray(edges, dtype=np.float64), v, side="right") - 1
    counts = np.bincount(np.clip(bins, 0, len(edges) - 1), minlength=len(edges))
    labels = [f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])] + [f">={edges[-1]}"]
    return {"edges": list(edges), "labels": labels, "counts": [int(c) for c in counts]}


def compute_stats(
    rows_in: int,
    counts: dict[str, int],
    kept: pd.DataFrame,
    meta: dict[tuple[str, str], dict[str, Any]],
    shards: list[dict[str, Any]],
    timings: dict[str, float],
    egress: dict[str, int] | None = None,
    watchdog_kills: int = 0,
) -> dict[str, Any]:
    by_stage: Counter[str] = Counter()
    for reason, n in counts.items():
        by_stage[reason.split("/", 1)[0]] += n
    rejected = sum(counts.values())
    captions = kept["caption"].astype(str).tolist() if len(kept) else []
    metas = [meta.get((t, k), {}) for t, k in zip(kept.get("source_tar", []), kept.get("key", []))]
    orig_side = [min(m["original_width"], m["original_height"]) for m in metas
                 if m.get("original_width") is not None and m.get("original_height") is not None]
    stored_side = [min(m["width"], m["height"]) for m in metas if m.get("width") is not None and m.get("height") is not None]
    n_kept = int(len(kept))
    return {
        "rows_in": int(rows_in),
        "kept": n_kept,
        "rejected": int(rejected),
        "unaccounted": int(rows_in - n_kept - rejected),
        "counts": dict(sorted((k, int(v)) for k, v in counts.items())),
        "counts_by_stage": dict(sorted(by_stage.items())),
        "num_shards": len(shards),
        "total_samples": sum(int(s["num_samples"]) for s in shards),
        "histograms": {
            "caption_chars": histogram([len(c) for c in captions], CAPTION_CHAR_EDGES),
            "caption_words": histogram([len(c.split()) for c in captions], CAPTION_WORD_EDGES),
            "original_shorter_side": histogram(orig_side, SIDE_EDGES),
            "stored_shorter_side": histogram(stored_side, SIDE_EDGES),
        },
        "timings_s": {k: round(float(v), 3) for k, v in sorted(timings.items())},
        "egress": dict(sorted((k, int(v)) for k, v in (egress or {}).items())),
        "watchdog_kills": int(watchdog_kills),
    }


def _rows(stats: dict[str, Any]) -> list[tuple[str, str, str]]:
    total = max(1, stats["rows_in"])
    rows = [("input", "rows", str(stats["rows_in"]))]
    for reason, n in stats["counts"].items():
        rows.append(("rejected", reason, f"{n} ({100 * n / total:.1f}%)"))
    rows.append(("kept", "samples", f"{stats['kept']} ({100 * stats['kept'] / total:.1f}%)"))
    if stats["unaccounted"]:
        rows.append(("ERROR", "unaccounted", str(stats["unaccounted"])))
    rows.append(("output", "shards", f"{stats['num_shards']} ({stats['total_samples']} samples)"))
    for reason, n in stats.get("egress", {}).items():
        rows.append(("egress", reason, str(n)))
    if stats.get("watchdog_kills"):
        rows.append(("watchdog", "stuck crawl processes killed", str(stats["watchdog_kills"])))
    for stage, secs in stats["timings_s"].items():
        rows.append(("time", stage, f"{secs:.1f} s"))
    return rows


def summary_table(stats: dict[str, Any]) -> str:
    rows = _rows(stats)
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    line = "+" + "+".join("-" * (x + 2) for x in w) + "+"
    body = ["| " + " | ".join(r[i].ljust(w[i]) for i in range(3)) + " |" for r in rows]
    return "\n".join([line, *body, line])


def stats_markdown(stats: dict[str, Any], chart: str | None = None) -> str:
    """The markdown page; `chart`: the reject-reason bar chart's file name beside it."""
    lines = ["# Data build statistics", ""]
    if chart:
        lines += [f"![rejected URLs by reason]({chart})", ""]
    lines += ["| | reason | count |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in _rows(stats)]
    for name, h in stats["histograms"].items():
        lines += ["", f"## {name.replace('_', ' ')}", "", "| bin | count |", "|---|---|"]
        lines += [f"| {lab} | {c} |" for lab, c in zip(h["labels"], h["counts"])]
    return "\n".join(lines) + "\n"
