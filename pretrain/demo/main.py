"""The main job end to end on the embedded default data (the README's ``make demo``).

1. builds the embedded "web" (``web.py``): real Fashion-MNIST training photos with generated
   captions and realistic noise, served by a local HTTP server on 127.0.0.1;
2. runs the data build CLI over its parquet URL list (crawl -> filter -> shards), with the
   test split written out as the filter's decontamination set (``filter.eval_overlap``):
   the test images planted in the web never reach the training shards;
3. trains a tiny CLIP with the ``deepspeed`` launcher: 2 CPU processes, ZeRO-1, MLflow;
4. evaluates zero-shot (prompt ensemble) on the held-out test split, none of whose images
   reached the training shards, plus a few-shot linear probe;
5. prints a summary and the command that opens the MLflow dashboard.

    python -m pretrain.demo [--out demo_out] [--images 24000] [--steps 1500] [--verbose]
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python -m pretrain.demo   # log to a server

Its output reads the same in a terminal and in a file: each stage's progress (a bar on a
terminal, else a line every ~10% or ~30 s with rate and ETA: pretrain/progress.py), no
library chatter. ``--verbose`` (``CLIP_VERBOSE=1`` for every stage) lets it all through:
img2dataset's own output (otherwise in ``OUT/data/crawl/img2dataset.log``), the DeepSpeed
launcher's and accelerator probe's lines, MLflow's info lines, the training line at every
logging step. Pictures: ``OUT/data/stats_rejects.png`` (linked from stats.md) and
``OUT/run/training_curves.png`` (also an MLflow artifact).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from data_pipeline.serve import ImageServer
from pretrain.demo.web import NoiseRates, build_web_files, write_eval_images, write_url_list
from pretrain.packaged_data import fashion_mnist_available
from pretrain.progress import VERBOSE_ENV, verbose
from pretrain.train.distributed import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _run(cmd: list[str], env: dict | None = None) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})})


def _bin(name: str) -> str:
    """An executable of this virtualenv (the deepspeed launcher) before anything on PATH."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


# The recipe (benchmarks/demo_recipe.py, benchmarks/RESULTS.md): at 1,200 steps of batch 128,
# zero-shot top-1 grew with the images the web serves (8,000: 84.0%, 16,000: 84.5%, 24,000:
# 85.4%, 32,000: 85.3%) and, at 24,000, with the steps (1,800: 86.3%), while patch size 8
# (81.7%), learning rate 2e-3 (83.0%) and a third ViT layer (84.5%) lost. 1,500 steps: the most
# that keeps `make demo` from a fresh clone, set-up included, under 15 minutes on 2 cores.
DEFAULT_IMAGES = 24000
DEFAULT_STEPS = 1500


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pretrain.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="output directory (wiped unless --keep)")
    p.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="training images served by the local web")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps (global batch 128)")
    p.add_argument("--eval-limit", type=int, default=0, help="evaluate on a subset of the test split (0: all)")
    p.add_argument("--shots", default="1,2,4,8,16", help="few-shot k values")
    p.add_argument("--keep", action="store_true", help="reuse an existing --out (resumable stages)")
    p.add_argument("--verbose", action="store_true",
                   help="let libraries' own output through (img2dataset, DeepSpeed, MLflow, warnings)")
    return p.parse_args(argv)


def quiet_env() -> dict[str, str]:
    """What the stages run with unless --verbose: the accelerator named (DeepSpeed's probe
    otherwise warns in every process that it found no GPU) and MLflow's info lines off."""
    if verbose():
        return {}
    import torch

    env = {"MLFLOW_LOGGING_LEVEL": os.environ.get("MLFLOW_LOGGING_LEVEL", "WARNING")}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
    return env


# pHash bits within which a training image counts as a test image. Fashion-MNIST's plain
# silhouettes collide: at the project's default 4, ~16% of the training images fall within
# reach of some test image; at 2, ~4%, and a test image re-rendered as the web serves it
# (224 px JPEG) still lands within 2 bits of its 28 px original ~98% of the time.
EVAL_OVERLAP_BITS = 2


def build_data(out: Path, n_images: int, noise: NoiseRates | None = None) -> tuple[Path, dict]:
    web = build_web_files(out / "web", n_images=n_images, image_px=224, seed=0, noise=noise)
    print(f"[demo] web: {len(web.rows)} URL rows over {n_images} {web.dataset} training images; "
          f"noise injected: {web.noise_counts}", flush=True)
    t = time.time()
    evals = write_eval_images(out / "eval_images", "test")
    print(f"[demo] decontamination set: the test split in {evals} ({time.time() - t:.1f} s)", flush=True)
    with ImageServer(out / "web") as server:
        urls = write_url_list(web, server.url(""), out / "urls.parquet")
        _run([sys.executable, "-m", "data_pipeline", "build", "--urls", str(urls), "--output", str(out / "data"),
              "--allow-private-addresses", "--processes", "2",
              "--crawl.number_sample_per_shard=2000", "--crawl.thread_count=16", "--crawl.timeout=5",
              # the demo's web is its own server on this machine: no per-host politeness limit
              # (the default 4 new connections/s would make its ~25,000 URLs take 1.7 hours)
              "--crawl.host_rate=0", "--crawl.host_max_connections=0",
              "--shard.samples_per_shard=2000", f"--filter.eval_overlap.eval_images={evals}",
              f"--filter.eval_overlap.max_distance={EVAL_OVERLAP_BITS}"])
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    return out / "data" / "manifest.json", manifest


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = _merge(base.get(k) or {}, v) if isinstance(v, dict) else v
    return base


def train(out: Path, manifest_path: Path, n_kept: int, steps: int, eval_dataset: str,
          run_config: dict | None = None, run_name: str = "run") -> Path:
    """Train on the built shards into OUT/RUN_NAME; `run_config` (nested, e.g.
    {"model": {"patch_dropout": 0.5}}) is merged over demo.yaml (benchmarks/demo_recipe.py)."""
    cfg = _merge(yaml.safe_load((HERE / "demo.yaml").read_text()), run_config or {})
    gb = cfg["train"]["global_batch"]
    cfg["output_dir"] = str(out / run_name)
    cfg["data"]["sources"] = [{"url": str(manifest_path), "weight": 1.0}]
    # epochs over the kept samples, enough of them to reach the requested step count
    cfg["data"]["samples_per_epoch"] = max(gb, (n_kept // gb) * gb)
    cfg["train"]["epochs"] = math.ceil(steps / (cfg["data"]["samples_per_epoch"] // gb))
    cfg["train"]["max_steps"] = steps
    cfg["eval"]["zeroshot_dataset"] = eval_dataset
    cfg["schedule"]["warmup_steps"] = min(cfg["schedule"]["warmup_steps"], max(0, steps // 5))
    cfg["checkpoint"]["every_steps"] = min(cfg["checkpoint"]["every_steps"], steps)
    cfg["logging"]["every_steps"] = max(1, min(cfg["logging"]["every_steps"], steps // 10))  # >= 10 points
    cfg["logging"]["console"] = "every" if verbose() else "paced"
    cfg_path = out / ("demo_run.yaml" if run_name == "run" else f"demo_{run_name}.yaml")
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    # a free port rather than the launcher's fixed 29500, which another job on this machine may hold;
    # the launcher's own info lines and its "no hostfile" warning (a one-machine run has none) only
    # with --verbose
    _run([_bin("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
          *([] if verbose() else ["--log_level", "error"]),
          str(REPO / "pretrain" / "run.py"), "--config", str(cfg_path)],
         env={"OMP_NUM_THREADS": "1"})
    return out / run_name


def evaluate(out: Path, run_dir: Path, dataset: str, limit: int, shots: str | None) -> dict:
    """Zero-shot, and the few-shot probe unless `shots` is None, into OUT/eval/TASK."""
    common = ["--checkpoint", str(run_dir), "--dataset", dataset, "--no-cache"]
    if limit:
        common += ["--limit", str(limit)]
    results = {}
    tasks = [("zeroshot", [])] + ([("few-shot", ["--shots", shots, "--seeds", "3", "--train-limit", "2000"])]
                                  if shots is not None else [])
    for task, extra in tasks:
        task_out = out / "eval" / run_dir.name / task if run_dir.name != "run" else out / "eval" / task
        _run([sys.executable, "-m", "pretrain.eval", task, *common, "--output-dir", str(task_out), *extra])
        own = [p for p in sorted(glob.glob(str(task_out / "*.json"))) if not p.endswith(".clip_benchmark.json")]
        results[task] = json.loads(Path(own[0]).read_text())  # (its table was printed by the eval CLI)
    return results


def train_throughput(run_dir: Path) -> float | None:
    """Median training samples/s over the trainer's logged intervals (metrics.jsonl)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rates = sorted(r["samples_per_s"] for r in map(json.loads, path.read_text().splitlines())
                   if "samples_per_s" in r)
    return round(rates[len(rates) // 2], 1) if rates else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # every stage below reads it (pretrain/progress.py)
    os.environ.update(quiet_env())
    out = Path(args.out).resolve()
    if out.exists() and not args.keep:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    dataset = "packaged:fashion-mnist" if fashion_mnist_available() else "packaged:mnist5k"
    manifest_path, manifest = build_data(out, args.images)
    t_data = time.time()
    stats = json.loads((out / "data" / "stats.json").read_text())
    run_dir = train(out, manifest_path, manifest["total_samples"], args.steps, dataset)
    t_train = time.time()
    res = evaluate(out, run_dir, dataset, args.eval_limit, args.shots)
    zs = res["zeroshot"]["metrics"]
    n_classes = len(json.loads((out / "web" / "web.json").read_text())["classnames"])
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir / 'mlflow.db'}"
    summary = {
        "dataset": dataset, "url_rows": stats["rows_in"], "rejected": stats["rejected"],
        "kept_samples": manifest["total_samples"],
        "eval_overlap_dropped": stats["counts"].get("filter/eval_overlap", 0), "shards": len(manifest["shards"]),
        "train_steps": args.steps, "train_samples_per_s": train_throughput(run_dir),
        "zeroshot_top1": zs["top1"], "chance": 1.0 / n_classes, "zeroshot_n": zs["n"],
        "minutes": {"data": round((t_data - t0) / 60, 2), "train": round((t_train - t_data) / 60, 2),
                    "eval": round((time.time() - t_train) / 60, 2)},
        "mlflow_tracking_uri": tracking,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n================ demo summary ================")
    print(f"data:       {summary['url_rows']} URL rows -> {summary['kept_samples']} kept samples in "
          f"{summary['shards']} shards; {summary['rejected']} rejected, every one counted by reason in "
          f"{out / 'data' / 'stats.md'}; {summary['eval_overlap_dropped']} dropped as test-split images "
          f"(filter/eval_overlap)")
    print(f"training:   {args.steps} steps, 2 CPU processes, ZeRO-1; "
          f"throughput {summary['train_samples_per_s'] or 'n/a'} samples/s")
    print(f"zero-shot:  top-1 {zs['top1']:.1%} on {zs['n']} held-out {dataset.split(':')[1]} test images "
          f"(chance {summary['chance']:.0%})")
    print(f"time:       {summary['minutes']}")
    figure = run_dir / "training_curves.png"
    print(f"pictures:   {out / 'data' / 'stats_rejects.png'}" + (f", {figure}" if figure.is_file() else ""))
    if tracking.startswith("sqlite:"):
        print(f"dashboard:  {_bin('mlflow')} ui --backend-store-uri {tracking} --host 127.0.0.1 --port 5000")
    else:
        print(f"dashboard:  {tracking}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
