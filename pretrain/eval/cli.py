"""Command line: ``python -m pretrain.eval TASK --checkpoint CKPT --dataset DATASET [options]``
(also installed as ``clip-eval``).

TASK: zeroshot | ablation | linear-probe | few-shot | retrieval.
CKPT: a training run dir (any ZeRO stage) or an OpenAI-layout checkpoint file.
DATASET: packaged:fashion-mnist | packaged:mnist5k | packaged:digits | imagefolder:ROOT |
wds:PATTERN | captions:PATTERN (see pretrain/eval/datasets.py). Probes train on
``--train-dataset`` (default: the same spec, split ``--train-split``).

    python -m pretrain.eval zeroshot --checkpoint runs/tiny --dataset packaged:fashion-mnist
    python -m pretrain.eval ablation --checkpoint exported.pt --dataset packaged:digits
    python -m pretrain.eval few-shot --checkpoint runs/tiny --dataset packaged:fashion-mnist --seeds 3
    python -m pretrain.eval retrieval --checkpoint runs/tiny --dataset captions:/data/val/manifest.json

Results: OUTPUT_DIR/<task>-<dataset>.json and .md (few-shot adds a PNG; zero-shot,
linear-probe and retrieval add <task>-<dataset>.clip_benchmark.json in CLIP_benchmark's layout); with
``--mlflow-run-id`` (and/or ``--mlflow-tracking-uri``) metrics and files go into that run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

import torch

TASKS = ("zeroshot", "ablation", "linear-probe", "few-shot", "retrieval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clip-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=TASKS)
    p.add_argument("--checkpoint", required=True, help="training run dir, hf:DIR (Hugging Face CLIP dir) or OpenAI-layout .safetensors/.pt file")
    p.add_argument("--tag", default=None, help="checkpoint tag inside a run dir (default: latest complete)")
    p.add_argument("--allow-torchscript-code", action="store_true",
                   help="accept a TorchScript archive as --checkpoint (e.g. OpenAI's released .pt): "
                        "loading it RUNS the code it contains; only for files you trust")
    p.add_argument("--dataset", required=True, help="KIND:VALUE eval set (test side for probes)")
    p.add_argument("--split", default="test")
    p.add_argument("--train-dataset", default=None, help="probe training set (default: --dataset)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--classnames", default=None, help="class-name file (.json list/dict or .txt lines)")
    p.add_argument("--templates", default="auto",
                   help="auto | openai_imagenet | openai_imagenet7 | single | name | <dataset> | FILE")
    p.add_argument("--limit", type=int, default=None, help="evaluate a fixed random subset of N items")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--image-size", type=int, default=None, help="OpenAI-layout files: resize positions to this")
    p.add_argument("--act", default=None, help="OpenAI-layout files: quick_gelu (default) or gelu")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json of a trained tokenizer (default: OpenAI's)")
    p.add_argument("--cache-dir", default=None, help="feature cache (default: $CLIP_PRETRAIN_CACHE/eval_features)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--output-dir", default="eval_out")
    p.add_argument("--shots", default="1,2,4,8,16", help="few-shot: comma-separated k values")
    p.add_argument("--seeds", type=int, default=5, help="few-shot: draws per k")
    p.add_argument("--val-fraction", type=float, default=0.2, help="probes: validation share for the C search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--mlflow-run-id", default=None)
    p.add_argument("--mlflow-tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI / MLflow's default")
    p.add_argument("--mlflow-experiment", default="clip-eval", help="used when only a tracking URI is given")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _tokenizer(path: str | None):
    from pretrain.tokenizer import ClipTokenizer, default_tokenizer

    return ClipTokenizer.load(path) if path else default_tokenizer()


def _log_mlflow(args: argparse.Namespace, results: dict, files: list[Path], prefix: str) -> str:
    from pretrain.eval.report import flat_metrics, log_to_mlflow

    run_id = args.mlflow_run_id
    if run_id is None:  # only a tracking URI: a fresh run in the eval experiment
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=args.mlflow_tracking_uri)
        exp = client.get_experiment_by_name(args.mlflow_experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(args.mlflow_experiment)
        run_id = client.create_run(exp_id, run_name=prefix.replace("/", "-")).info.run_id
        client.log_param(run_id, "checkpoint", args.checkpoint)
        log_to_mlflow(run_id, args.mlflow_tracking_uri, flat_metrics(results, prefix), files)
        client.set_terminated(run_id)
    else:
        log_to_mlflow(run_id, args.mlflow_tracking_uri, flat_metrics(results, prefix), files)
    return run_id


def run(args: argparse.Namespace) -> dict:
    from pretrain.assets import cache_dir
    from pretrain.eval import tasks
    from pretrain.eval.checkpoints import load_checkpoint
    from pretrain.eval.datasets import load_eval_dataset
    from pretrain.eval.features import FeatureCache
    from pretrain.eval.clip_benchmark import to_clip_benchmark
    from pretrain.eval.report import write_results

    device = _device(args.device)
    model, fp = load_checkpoint(args.checkpoint, device=device, tag=args.tag, image_size=args.image_size, act=args.act,
                                allow_torchscript=args.allow_torchscript_code)
    cache = None if args.no_cache else FeatureCache(args.cache_dir or cache_dir() / "eval_features")
    ctx = tasks.EvalContext(model, _tokenizer(args.tokenizer), device=device, batch_size=args.batch_size,
                            num_workers=args.num_workers, cache=cache, checkpoint_fp=fp, progress=not args.quiet)
    test = load_eval_dataset(args.dataset, args.split, limit=args.limit, classnames=args.classnames)
    if test.problems.total:
        logging.warning("%s: skipped while indexing: %s", args.dataset, test.problems.counts)
    out_dir = Path(args.output_dir)
    if args.task in ("linear-probe", "few-shot"):
        train = load_eval_dataset(args.train_dataset or args.dataset, args.train_split, limit=args.train_limit,
                                  classnames=args.classnames)
        if args.task == "linear-probe":
            res, md, files = tasks.run_linear_probe(ctx, train, test, val_fraction=args.val_fraction,
                                                    seed=args.seed, max_iter=args.max_iter)
        else:
            shots = [int(k) for k in args.shots.split(",") if k.strip()]
            res, md, files = tasks.run_few_shot(ctx, train, test, out_dir=out_dir, shots=shots, seeds=args.seeds,
                                                templates=args.templates, val_fraction=args.val_fraction,
                                                max_iter=args.max_iter)
    elif args.task == "retrieval":
        res, md, files = tasks.run_retrieval(ctx, test)
    elif args.task == "ablation":
        res, md, files = tasks.run_ablation(ctx, test, args.templates)
    else:
        res, md, files = tasks.run_zeroshot(ctx, test, args.templates)
    res.update(checkpoint=str(args.checkpoint), checkpoint_fingerprint=fp, dataset_spec=args.dataset,
               split=args.split, indexing_problems=test.problems.counts)
    files = write_results(out_dir, f"{args.task}-{test.name}", res, md) + files
    cb = to_clip_benchmark(res, model=Path(str(args.checkpoint)).name, pretrained=str(args.checkpoint))
    if cb is not None:  # the same numbers in CLIP_benchmark's layout (pretrain/eval/clip_benchmark.py)
        cb_path = out_dir / (re.sub(r"[^\w.\-]", "_", f"{args.task}-{test.name}") + ".clip_benchmark.json")
        cb_path.write_text(json.dumps(cb, indent=2) + "\n", encoding="utf-8")
        files.append(cb_path)
    print(md)
    print("wrote " + ", ".join(str(f) for f in files))
    if args.mlflow_run_id or args.mlflow_tracking_uri:
        run_id = _log_mlflow(args, res, files, f"eval/{args.task}/{test.name}")
        print(f"logged to MLflow run {run_id}")
    return res


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[eval] %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"clip-eval: error: {e}", file=sys.stderr)
        return 2
    return 0
