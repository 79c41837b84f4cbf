"""The data build's reject-reason bar chart: ``OUT/stats_rejects.png``, linked from stats.md.

One horizontal bar per ``stage/reason`` of ``stats.json``'s counts (every rejected URL
once), largest on top, each labelled with its count and its share of the input rows; the
title gives the totals (rejected, kept). A build that rejected nothing gets a chart saying so. Rendered with matplotlib's Agg backend (no display needed) at a fixed size:
``WIDTH_PX`` wide, ``height_px(n)`` high for n bars, so a reader (or a test) knows what to
expect.

    png = reject_chart_png(stats)   # bytes; write them beside stats.md
"""
from __future__ import annotations

import io
from typing import Any

CHART_NAME = "stats_rejects.png"
DPI = 100
WIDTH_PX = 900


def height_px(n_bars: int) -> int:
    return int(DPI * max(2.5, 1.2 + 0.32 * n_bars))


def reject_chart_png(stats: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: never a display, also on a desktop
    import matplotlib.pyplot as plt

    counts = sorted(stats["counts"].items(), key=lambda kv: (-kv[1], kv[0]))
    labels = [k for k, _ in counts] or ["(nothing rejected)"]
    values = [v for _, v in counts] or [0]
    total = max(1, stats["rows_in"])
    fig = plt.figure(figsize=(WIDTH_PX / DPI, height_px(len(values)) / DPI), dpi=DPI)
    try:
        ax = fig.add_axes((0.34, 0.8 / (height_px(len(values)) / DPI), 0.56,
                           1 - 1.2 / (height_px(len(values)) / DPI)))
        y = list(range(len(values)))[::-1]  # the largest reason on top
        ax.barh(y, values, color="#c0504d")
        ax.set_yticks(y, labels, fontsize=9)
        ax.set_xlabel(f"URLs (of {stats['rows_in']} input rows)")
        ax.set_title(f"data build: {stats['rejected']} of {stats['rows_in']} URLs rejected, by reason "
                     f"({stats['kept']} kept)", fontsize=10)
        top = max(values) if values else 1
        ax.set_xlim(0, top * 1.25 if top else 1)
        for yi, v in zip(y, values):
            ax.text(v + top * 0.01, yi, f"{v} ({100 * v / total:.1f}%)", va="center", fontsize=8)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
        return buf.getvalue()
    finally:
        plt.close(fig)
