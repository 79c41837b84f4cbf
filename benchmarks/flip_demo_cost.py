"""What FLIP-style patch dropout (`model.patch_dropout`, "Scaling Language-Image Pre-training
via Masking", Li et al., arXiv 2212.00794) costs in zero-shot accuracy on the demo's data,
and what it saves in training time, on this machine.

    .venv/bin/python benchmarks/flip_demo_cost.py [--out flip_out] [--steps 600] [--rates 0,0.5]
        [--patch-size 8] [--keep]

1. builds the demo's data once (pretrain/demo: the embedded "web" of Fashion-MNIST photos with
   generated captions, crawled, filtered and sharded by the data build; `--keep` reuses it);
2. trains the demo's model (pretrain/demo/demo.yaml: ViT-tiny at 32 px, global batch 128,
   2 CPU processes, ZeRO-1) once per dropout rate, with only `model.patch_dropout` differing
   (and `--patch-size`, for every rate, where given: at 32 px the demo's patch 16 leaves 4
   patches, patch 8 leaves 16), through the demo's own `train`;
3. evaluates each run zero-shot on the held-out test split (the demo's `evaluate`, prompt
   ensemble, every test image unless `--eval-limit`), and prints a markdown table: top-1,
   training minutes and samples/s per rate, and the change against the first rate.

FLIP drops patches during training only; evaluation sees every patch (its paper also
un-masks for a short final tuning, which this script does not do).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_line, md_table  # noqa: E402

from pretrain.demo.main import build_data, evaluate, train, train_throughput  # noqa: E402
from pretrain.packaged_data import fashion_mnist_available  # noqa: E402

HEADERS = ["patch_dropout", "patch size", "zero-shot top-1", "vs first", "train minutes", "train samples/s",
           "time vs first"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="flip_out")
    p.add_argument("--images", type=int, default=8000, help="training images served by the demo's local web")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    p.add_argument("--rates", default="0,0.5", help="patch-dropout rates, comma-separated (first = baseline)")
    p.add_argument("--patch-size", type=int, default=None, help="ViT patch size for every run (default: the demo's)")
    p.add_argument("--eval-limit", type=int, default=0, help="test images per evaluation (0: all)")
    p.add_argument("--keep", action="store_true", help="reuse <out>/data from an earlier run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dataset = "packaged:fashion-mnist" if fashion_mnist_available() else "packaged:mnist5k"
    manifest_path = out / "data" / "manifest.json"
    if args.keep and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
    else:
        manifest_path, manifest = build_data(out, args.images)
    rows, results = [], []
    for rate in (float(r) for r in args.rates.split(",")):
        model: dict = {"patch_dropout": rate}
        if args.patch_size:
            model["overrides"] = {"vision_patch_size": args.patch_size}  # merged over image_size 32
        name = f"run_pd{rate:g}" + (f"_p{args.patch_size}" if args.patch_size else "")
        t0 = time.time()
        run_dir = train(out, manifest_path, manifest["total_samples"], args.steps, dataset,
                        run_config={"model": model}, run_name=name)
        minutes = (time.time() - t0) / 60
        top1 = evaluate(out, run_dir, dataset, args.eval_limit, shots=None)["zeroshot"]["metrics"]["top1"]
        results.append({"rate": rate, "top1": top1, "minutes": minutes, "samples_per_s": train_throughput(run_dir)})
        base = results[0]
        rows.append([f"{rate:g}", args.patch_size or "demo's", f"{100 * top1:.1f}%",
                     f"{100 * (top1 - base['top1']):+.1f} points", f"{minutes:.1f}",
                     results[-1]["samples_per_s"] or "-", f"{minutes / base['minutes']:.2f}x"])
        print(md_table(HEADERS, rows[-1:]).splitlines()[-1], flush=True)
    text = (f"{machine_line('cpu')}\n# {args.steps} steps at global batch 128, {manifest['total_samples']} "
            f"training pairs, zero-shot on {dataset}\n\n{md_table(HEADERS, rows)}\n")
    (out / "flip_cost.md").write_text(text)
    (out / "flip_cost.json").write_text(json.dumps(results, indent=2))
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
