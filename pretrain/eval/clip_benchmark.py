"""Our eval results in CLIP_benchmark's result-JSON layout (LAION-AI/CLIP_benchmark README:
``{"dataset", "model", "pretrained", "task", "metrics": {"acc1", "acc5", ...}, "language"}``),
so its ``clip_benchmark build *.json`` tooling and dashboards read them.

Task names and metric keys follow CLIP_benchmark: zero-shot -> ``zeroshot_classification``
(acc1, acc5, mean_per_class_recall), linear-probe -> ``linear_probe`` (same keys),
retrieval -> ``zeroshot_retrieval`` (``image_retrieval_recall@K`` = text->image,
``text_retrieval_recall@K`` = image->text). Values are fractions in [0, 1], as there.
Other tasks (few-shot, ablation) have no CLIP_benchmark counterpart: None.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

_TASKS = {"zeroshot": "zeroshot_classification", "linear-probe": "linear_probe", "retrieval": "zeroshot_retrieval"}
_CLS = {"top1": "acc1", "top5": "acc5", "mean_per_class_recall": "mean_per_class_recall"}


def to_clip_benchmark(results: Mapping[str, Any], model: str, pretrained: str,
                      language: str = "en") -> dict[str, Any] | None:
    task = _TASKS.get(str(results.get("task")))
    if task is None:
        return None
    m = results.get("metrics") or {}
    if task == "zeroshot_retrieval":
        metrics = {}
        for key, value in m.items():
            if (hit := re.fullmatch(r"(i2t|t2i)_r(\d+)", key)) and value is not None:
                side = "text" if hit.group(1) == "i2t" else "image"
                metrics[f"{side}_retrieval_recall@{hit.group(2)}"] = float(value)
    else:
        metrics = {ours: float(m[k]) for k, ours in _CLS.items() if m.get(k) is not None}
    return {"dataset": results.get("dataset"), "model": model, "pretrained": pretrained, "task": task,
            "metrics": metrics, "language": language}
