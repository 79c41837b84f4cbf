"""Writing eval results: JSON + markdown files, and metrics + artifacts into an MLflow run.

    paths = write_results("eval_out", "zeroshot-fashion-mnist", results, markdown)
    log_to_mlflow(run_id, tracking_uri, flat_metrics(results, "eval/zeroshot/fashion-mnist"), paths)
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from pretrain import fs


def flat_metrics(results: Mapping, prefix: str) -> dict[str, float]:
    """Numeric leaves of a nested result dict as ``prefix/a/b`` -> float (lists and text skipped)."""
    out: dict[str, float] = {}
    for key, value in results.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flat_metrics(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[re.sub(r"[^\w./\- :]", "_", name)] = float(value)  # MLflow's allowed key characters
    return out


def markdown_table(rows: Iterable[Mapping], columns: list[str]) -> str:
    def cell(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(out_dir: str | Path, stem: str, results: Mapping, markdown: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^\w.\-]", "_", stem)
    jp, mp = out / f"{stem}.json", out / f"{stem}.md"
    fs.write_text(jp, json.dumps(results, indent=2, default=str) + "\n")  # atomic: old or new, never half
    fs.write_text(mp, markdown)
    return [jp, mp]


def log_to_mlflow(
    run_id: str, tracking_uri: str | None, metrics: Mapping[str, float],
    artifacts: Iterable[Path] = (), artifact_dir: str = "eval", step: int | None = None,
) -> None:
    """Log into an existing run (metrics, then files under ``artifact_dir``)."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=tracking_uri)
    client.get_run(run_id)  # fail early and clearly on a wrong run id
    now = int(time.time() * 1000)
    items = [Metric(key, value, now, step or 0) for key, value in metrics.items()]
    for start in range(0, len(items), 1000):  # one request per 1000 metrics (MLflow's batch limit)
        client.log_batch(run_id, metrics=items[start:start + 1000])
    for path in artifacts:
        client.log_artifact(run_id, str(path), artifact_path=artifact_dir)
