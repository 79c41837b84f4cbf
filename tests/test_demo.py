"""The README's main job, shortened (same code path, fewer images and steps), with every
stage's output checked and the MLflow run read back through a real ``mlflow server``'s REST API."""
from __future__ import annotations

import json
import os
import sys
import urllib.request

import pytest
import webdataset as wds

from watched import run_watched

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def mlflow_server(mlflow_module_server) -> str:
    return mlflow_module_server.url


def _rest(url: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.timeout(1200)
def test_demo_end_to_end(tmp_path, mlflow_server):
    out = tmp_path / "demo"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    # about a minute on 2 cores; a hang fails with every process's stacks (tests/watched.py)
    proc = run_watched(
        [sys.executable, "-m", "pretrain.demo", "--out", str(out), "--images", "400", "--steps", "20",
         "--eval-limit", "300", "--shots", "1,2"],
        env=env, log=tmp_path / "demo.log", timeout=900)
    assert proc.returncode == 0, proc.output[-8000:]

    # 1. the embedded web: noise of every kind was injected and served
    web = json.loads((out / "web" / "web.json").read_text())
    assert all(v > 0 for k, v in web["noise"].items() if k != "boilerplate_caption"), web["noise"]

    # 2. the data build: every URL row is kept or counted, broken URLs and images rejected
    stats = json.loads((out / "data" / "stats.json").read_text())
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert stats["rows_in"] == web["n_rows"]
    assert stats["unaccounted"] == 0 and stats["kept"] + stats["rejected"] == stats["rows_in"]
    assert stats["counts"].get("download/http_error", 0) >= web["noise"]["missing_file"]
    assert stats["counts"].get("decode/undecodable", 0) >= web["noise"]["truncated_jpeg"]
    dups = stats["counts"].get("filter/duplicate_image", 0) + stats["counts"].get("filter/near_duplicate", 0)
    assert dups >= web["noise"]["duplicate_url"] + web["noise"]["same_image_other_url"]
    n = sum(1 for _ in wds.WebDataset(
        [str(out / "data" / s["path"]) for s in manifest["shards"]], shardshuffle=False))
    assert n == manifest["total_samples"] == stats["kept"] > 0.8 * 400

    # 3. training: a complete checkpoint at the last step, metrics logged, loss went down
    run = out / "run"
    assert (run / "checkpoints" / "step_00000020" / "COMPLETE").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 20 and rows[-1]["loss"] < rows[0]["loss"]

    # 4. evaluation on the held-out split, and the summary
    summary = json.loads((out / "summary.json").read_text())
    assert summary["zeroshot_n"] == 300 and 0.0 <= summary["zeroshot_top1"] <= 1.0
    assert summary["zeroshot_top1"] > summary["chance"]  # 20 steps: above chance, not the full demo's 75%
    assert summary["train_samples_per_s"] and summary["train_samples_per_s"] > 0
    few = json.loads(next((out / "eval" / "few-shot").glob("*.json")).read_text())
    assert set(few["shots"]) == {"1", "2"}
    assert "dashboard:" in proc.output and mlflow_server in proc.output

    # 5. the MLflow run, seen through the server's REST API
    exps = _rest(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=clip-demo")
    runs = _rest(mlflow_server, "/api/2.0/mlflow/runs/search",
                 {"experiment_ids": [exps["experiment"]["experiment_id"]], "max_results": 10})["runs"]
    assert len(runs) == 1
    data = runs[0]["data"]
    params = {p["key"]: p["value"] for p in data["params"]}
    assert params["model.name"] == "ViT-tiny" and params["train.zero_stage"] == "1"
    metrics = {m["key"]: m["value"] for m in data["metrics"]}
    assert "loss" in metrics and "eval/zeroshot_top1" in metrics
    hist = _rest(mlflow_server, f"/api/2.0/mlflow/metrics/get-history?run_id={runs[0]['info']['run_id']}&metric_key=loss")
    assert [m["step"] for m in hist["metrics"]][-1] == 20
    figures = _rest(mlflow_server, f"/api/2.0/mlflow/artifacts/list?run_id={runs[0]['info']['run_id']}&path=figures")
    assert [f["path"] for f in figures["files"]] == ["figures/training_curves.png"]

    # 6. what a reader of the output (a file here, no terminal) sees: progress lines, no
    # redraw fragments, no library chatter (that needs --verbose); and the two pictures
    raw = (tmp_path / "demo.log").read_bytes()  # (read_text would turn a '\r' into a newline)
    assert b"\r" not in raw and b"[progress] crawl: download: " in raw
    for chatter in ("Setting accelerator to CPU", "built successfully", "Starting the downloading",
                    "Unable to find hostfile", "Processing zero checkpoint", "Creating initial MLflow"):
        assert chatter not in proc.output, chatter
    for png in (out / "data" / "stats_rejects.png", run / "training_curves.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
