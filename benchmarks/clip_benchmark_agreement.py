"""Zero-shot top-1 of a trained run by our eval and by the real `clip_benchmark` package
(LAION-AI/CLIP_benchmark), which loads our export through open_clip: the two must agree
within 0.2 points on the demo's test split.

    .venv/bin/python benchmarks/clip_benchmark_agreement.py RUN_DIR [--dataset packaged:fashion-mnist]
        [--tag TAG] [--limit N] [--work DIR] [--max-diff 0.2]

RUN_DIR: a training run (e.g. `make demo`'s demo_out/run). Steps, all on CPU in fp32:
1. ours: `python -m pretrain.eval zeroshot --checkpoint RUN_DIR --dataset DATASET` (the
   dataset's own templates, `--templates auto`), which also writes its result in
   CLIP_benchmark's JSON layout (pretrain/eval/clip_benchmark.py);
2. `clip-export RUN_DIR WORK/export/NAME --open-clip-config`: OpenAI-layout safetensors and
   the open_clip model config;
3. the same test split written as a clip_benchmark `wds/` dataset (PNG, lossless: the
   pixels our loader reads), with classnames.txt and zeroshot_classification_templates.txt
   holding our class names and templates;
4. `clip_benchmark eval --model_type open_clip --model NAME --pretrained FILE --dataset
   wds/... --task zeroshot_classification --no_amp`, clip_benchmark's own CLI, in the peer
   virtualenv (.venv-peer, scripts/setup_peer.sh) after `open_clip.add_model_config`
   (this script re-entered with --peer-cli); its result JSON is read back.
Prints both results and the differences; exits 1 when top-1 differs by more than --max-diff points.

Protocol, and where the two differ:
- templates: the same list; ours fill "{}", clip_benchmark calls `template.format(c=name)`,
  so each "{}" is written as "{c}" (no template here holds another brace).
- prompt ensembling: both L2-normalise each template's text embedding, average over the
  templates and renormalise (embedding-space ensembling, the CLIP paper's); logits are
  100 * cosine on both sides.
- images: clip_benchmark uses open_clip's eval transform (Resize shorter side to S, bicubic;
  CenterCrop S; RGB; OpenAI mean/std), ours EvalTransform, the same steps in the same order
  and the same pixels (tests/test_openclip_interop.py). For the 28x28 Fashion-MNIST images
  and S = 32 that is a bicubic upscale of the grey image, then grey -> RGB; no crop cuts anything.
- precision: clip_benchmark's default is autocast (`--amp`; float16 on CUDA, bfloat16 on CPU),
  ours fp32 on CPU and bf16 autocast on CUDA; this script runs both in fp32 (`--no_amp`).
- metrics: acc1 / acc5 are top-k accuracy on both sides; mean per-class recall is
  scikit-learn's balanced accuracy there and the mean of per-class recalls here (the same).
  Ties between classes (rare at fp32) may be broken differently.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER_PY = Path(os.environ.get("PEER_VENV", REPO / ".venv-peer")) / "bin" / "python"
MODEL_NAME = "run-under-test"  # the open_clip model name of our export's config file


def peer_cli(config_dir: str, argv: list[str]) -> None:
    """In the peer virtualenv: register our model config, then clip_benchmark's own CLI."""
    import open_clip
    from clip_benchmark import cli

    open_clip.add_model_config(config_dir)
    sys.argv = ["clip_benchmark", *argv]
    cli.main()


def run(cmd: list[str], env: dict | None = None, timeout: float = 3600) -> str:
    print("$ " + " ".join(cmd), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        sys.exit(f"failed (rc {out.returncode}): {' '.join(cmd[:4])} ...\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return out.stdout


def write_wds(ds, templates: list[str], root: Path, per_shard: int = 5000) -> Path:
    """Our eval set (a labelled EvalDataset) in clip_benchmark's wds layout: test/{0..n-1}.tar
    (png + cls), test/nshards.txt, classnames.txt, zeroshot_classification_templates.txt."""
    import io

    import webdataset as wds

    test = root / "test"
    test.mkdir(parents=True, exist_ok=True)
    n = len(ds.labels)
    shards = (n + per_shard - 1) // per_shard
    for s in range(shards):
        with wds.TarWriter(str(test / f"{s}.tar")) as sink:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                buf = io.BytesIO()
                ds.images.load(i).save(buf, format="PNG")  # the PIL image our transform receives
                sink.write({"__key__": f"s{i:06d}", "png": buf.getvalue(), "cls": int(ds.labels[i])})
    (test / "nshards.txt").write_text(f"{shards}\n")
    (root / "classnames.txt").write_text("\n".join(ds.classnames) + "\n")
    for t in templates:
        if "{c}" in t or t.replace("{}", "").count("{") or t.count("}") > 1:
            raise ValueError(f"template {t!r} cannot be written for str.format")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(t.replace("{}", "{c}") for t in templates) + "\n")
    return root


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--peer-cli":
        peer_cli(argv[1], argv[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--dataset", default="packaged:fashion-mnist")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the newest complete one, read once)")
    p.add_argument("--limit", type=int, default=None, help="a fixed subset (both sides see the same items)")
    p.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    p.add_argument("--max-diff", type=float, default=0.2, help="allowed top-1 difference, in points")
    args = p.parse_args(argv)
    if not PEER_PY.is_file():
        sys.exit(f"{PEER_PY} missing: build the peer virtualenv with scripts/setup_peer.sh")
    sys.path.insert(0, str(REPO))
    from pretrain.eval.datasets import load_eval_dataset
    from pretrain.eval.templates import resolve_templates

    from pretrain.modelio import newest_complete_tag

    # one tag for both sides, even while the run is still writing checkpoints
    tag = args.tag or newest_complete_tag(args.run_dir)
    if tag is None:
        sys.exit(f"{args.run_dir}: no complete checkpoint")
    work = Path(args.work or tempfile.mkdtemp(prefix="cb_agree_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}

    # 1. ours
    ours_dir = work / "ours"
    lim = ["--limit", str(args.limit)] if args.limit else []
    run([sys.executable, "-m", "pretrain.eval", "zeroshot", "--checkpoint", args.run_dir, "--tag", tag, "--dataset", args.dataset,
         "--device", "cpu", "--no-cache", "--quiet", "--output-dir", str(ours_dir), *lim], env=env)
    own = [q for q in sorted(ours_dir.glob("*.json")) if not q.name.endswith(".clip_benchmark.json")]
    cb_layout = sorted(ours_dir.glob("*.clip_benchmark.json"))
    ours = json.loads(own[0].read_text())
    ours_cb = json.loads(cb_layout[0].read_text()) if cb_layout else None
    # 2. the export
    export = work / "export"
    run([sys.executable, "-m", "pretrain.export", args.run_dir, str(export / MODEL_NAME), "--tag", tag, "--open-clip-config"], env=env)
    # 3. the same items for clip_benchmark
    ds = load_eval_dataset(args.dataset, split="test", limit=args.limit)
    templates = resolve_templates("auto", ds.name)
    assert templates == ours["templates"], (templates, ours["templates"])
    wds_root = write_wds(ds, templates, work / "wds")
    # 4. clip_benchmark's CLI on our export, in the peer virtualenv
    result = work / "clip_benchmark.json"
    peer_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    peer_env.update(HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    run([str(PEER_PY), str(Path(__file__).resolve()), "--peer-cli", str(export), "eval",
         "--model_type", "open_clip", "--model", MODEL_NAME, "--pretrained", str(export / f"{MODEL_NAME}.safetensors"),
         "--dataset", f"wds/{ds.name}", "--dataset_root", str(wds_root), "--task", "zeroshot_classification",
         "--no_amp", "--batch_size", "256", "--num_workers", "0", "--output", str(result)], env=peer_env)
    theirs = json.loads(result.read_text())

    m, t = ours["metrics"], theirs["metrics"]
    rows = [("acc1 (top-1)", m["top1"], t["acc1"]), ("acc5", m.get("top5"), t.get("acc5")),
            ("mean per-class recall", m["mean_per_class_recall"], t["mean_per_class_recall"])]
    versions = run([str(PEER_PY), "-c", "import open_clip, clip_benchmark, torch, importlib.metadata as md; "
                    "print(f\"open_clip {open_clip.__version__}, clip_benchmark {md.version('clip_benchmark')}, "
                    "peer torch {torch.__version__}\")"], env=peer_env).strip()
    import torch

    print(f"\n# date {_dt.datetime.now().isoformat(timespec='minutes')}, device {os.cpu_count()}-core CPU "
          f"({platform.processor() or platform.machine()}), load avg {' '.join(f'{x:.1f}' for x in os.getloadavg())}, "
          f"torch {torch.__version__}, {versions}")
    print(f"# {args.run_dir} ({tag}) on {ds.name} test ({m['n']} images), {len(templates)} templates, fp32 CPU\n")
    print("| metric | ours (pretrain.eval) | clip_benchmark (open_clip, our export) | diff (points) |")
    print("|---|---|---|---|")
    for name, a, b in rows:
        if a is None or b is None:
            continue
        print(f"| {name} | {100 * a:.2f} | {100 * b:.2f} | {100 * (a - b):+.3f} |")
    if ours_cb is not None:
        same = ours_cb["task"] == theirs["task"] and set(ours_cb["metrics"]) <= set(theirs["metrics"])
        print(f"\nour CLIP_benchmark-layout JSON: task {ours_cb['task']!r}, metric keys "
              f"{sorted(ours_cb['metrics'])} ({'match' if same else 'DIFFER FROM'} clip_benchmark's)")
    diff = 100 * abs(m["top1"] - t["acc1"])
    ok = diff <= args.max_diff
    print(f"\ntop-1 |diff| = {diff:.3f} points: {'within' if ok else 'OUTSIDE'} {args.max_diff}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
