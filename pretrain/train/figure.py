"""The run's training-curve figure: ``<run dir>/training_curves.png`` (rank 0).

Four panels over the optimizer step, read from what the run dir already holds
(``metrics.jsonl`` and ``eval/step_*.json``, so a resumed run's figure covers the whole run):
the loss, the learning rate, the logit scale (the softmax temperature's inverse, ``exp`` of
the learned parameter) and the zero-shot top-1 accuracy at each evaluation (a panel that
says "no evaluation yet" until the first one). Drawn with matplotlib's Agg backend (no
display) at a fixed size, ``WIDTH_PX`` x ``HEIGHT_PX``, and written atomically; the loop
redraws it after each evaluation and at the end and hands it to MLflow as the artifact
``figures/training_curves.png``.

    path = write_training_figure(run_dir)   # None (and a warning) if it could not be drawn
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

from pretrain import fs

log = logging.getLogger(__name__)

FIGURE_NAME = "training_curves.png"
ARTIFACT_DIR = "figures"
DPI = 100
WIDTH_PX, HEIGHT_PX = 1000, 700


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill: the rest is still drawn
    return rows


def _evals(run_dir: Path) -> list[tuple[int, float]]:
    points = []
    for p in sorted((run_dir / "eval").glob("step_*.json")):
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
            points.append((int(doc["step"]), float(doc["zeroshot"]["top1"])))
        except (ValueError, KeyError, TypeError, OSError):
            continue  # no zero-shot in this evaluation (retrieval only) or unreadable
    return points


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v) and "step" in r:
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def training_figure_png(run_dir: str | Path) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: never a display
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = _read_jsonl(run_dir / "metrics.jsonl")
    fig, axes = plt.subplots(2, 2, figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI)
    try:
        for ax, key, title in ((axes[0][0], "loss", "training loss"), (axes[0][1], "lr", "learning rate"),
                               (axes[1][0], "logit_scale", "logit scale")):
            xs, ys = _series(rows, key)
            ax.plot(xs, ys, color="#1f77b4", linewidth=1.2)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step", fontsize=9)
            ax.grid(alpha=0.3)
        ax = axes[1][1]
        points = _evals(run_dir)
        if points:
            ax.plot([s for s, _ in points], [100 * a for _, a in points], marker="o", color="#d62728")
            for s, a in points[-1:]:
                ax.annotate(f"{100 * a:.1f}%", (s, 100 * a), textcoords="offset points", xytext=(-34, 6),
                            fontsize=8)
        else:
            ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes)
        last = max([s for s, _ in points] + [int(r["step"]) for r in rows if isinstance(r.get("step"), int)] + [1])
        ax.set_xlim(0, last * 1.05)  # the same step range as the training curves
        ax.set_title("zero-shot top-1 (%) per evaluation", fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
        fig.suptitle(run_dir.name, fontsize=11)
        fig.tight_layout()  # moves the axes inside the canvas; the canvas size stays fixed
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
        return buf.getvalue()
    finally:
        plt.close(fig)


def write_training_figure(run_dir: str | Path) -> Path | None:
    """Draw and write the figure; a failure is logged, never raised (it must not stop training)."""
    path = Path(run_dir) / FIGURE_NAME
    try:
        fs.write_bytes(path, training_figure_png(run_dir))
    except Exception as exn:  # noqa: BLE001 - a figure is never worth a failed run
        log.warning("training figure not written: %s: %s", type(exn).__name__, exn)
        return None
    return path
