"""Recipe variants of the demo's training run, measured on the demo's own data: zero-shot top-1
and training time per variant, against the first one, on this machine.

    .venv/bin/python benchmarks/demo_recipe.py [--out recipe_out] [--images 24000] [--steps 1200] [--keep] \
        [--eval-limit N] --variant 'demo={}' --variant 'p8={model: {overrides: {vision_patch_size: 8}}}' \
        --variant 'flip={model: {patch_dropout: 0.5}}' --variant 'long={steps: 1800}' --variant 'more={images: 16000}'

1. builds the demo's data (pretrain/demo: the embedded "web" of Fashion-MNIST photos with
   generated captions, crawled, filtered and sharded by the data build) once per number of
   images into OUT/images_N; `--keep` reuses one from an earlier run;
2. trains once per `--variant NAME=YAML`: a nested run-config mapping merged over
   pretrain/demo/demo.yaml (ViT-tiny at 32 px, global batch 128, 2 CPU processes, ZeRO-1)
   through the demo's own `train`, so a variant differs from the demo only in what it names;
   two top-level keys are not run-config keys: `steps` sets that variant's optimizer steps,
   `images` the number of training images the demo's web serves (one data build per number);
3. evaluates each run zero-shot on the held-out test split with the demo's `evaluate`
   (prompt ensemble; every test image, as the demo, unless `--eval-limit`), and prints a markdown
   table: top-1, its change against the first variant, training minutes and samples/s.

One seed per variant: a difference of a point or so may be the seed's, not the recipe's.
FLIP (`model.patch_dropout`, "Scaling Language-Image Pre-training via Masking", Li et al.,
arXiv 2212.00794) drops patches during training only; evaluation sees every patch (its
paper also un-masks for a short final tuning, which this script does not do).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_line, md_table  # noqa: E402

from pretrain.demo.main import (DEFAULT_IMAGES, DEFAULT_STEPS, build_data, evaluate, train,  # noqa: E402
                                 train_throughput)
from pretrain.packaged_data import fashion_mnist_available  # noqa: E402

HEADERS = ["variant", "what differs from demo.yaml", "images", "kept pairs", "steps", "zero-shot top-1", "vs first",
           "train minutes", "train samples/s", "time vs first"]


def parse_variant(text: str) -> tuple[str, dict]:
    """'NAME=YAML' -> (NAME, mapping); a clear error for anything else."""
    name, sep, body = text.partition("=")
    name = name.strip()
    if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"--variant wants NAME=YAML with NAME of letters, digits, - or _: {text!r}")
    try:
        spec = yaml.safe_load(body) if body.strip() else {}
    except yaml.YAMLError as exn:
        raise argparse.ArgumentTypeError(f"--variant {name}: not YAML ({exn})") from None
    if not isinstance(spec, dict):
        raise argparse.ArgumentTypeError(f"--variant {name}: wants a mapping, got {type(spec).__name__}")
    return name, spec


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="recipe_out")
    p.add_argument("--images", type=int, default=DEFAULT_IMAGES,
                   help="training images served by the demo's local web (a variant's `images` wins)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help="optimizer steps of a variant without its own `steps`")
    p.add_argument("--variant", type=parse_variant, action="append", default=None,
                   help="NAME=YAML run-config overrides (repeatable; the first is the baseline; default: demo={})")
    p.add_argument("--eval-limit", type=int, default=0, help="test images per evaluation (0: all, as the demo)")
    p.add_argument("--keep", action="store_true", help="reuse <out>/images_N/data from an earlier run")
    args = p.parse_args(argv)
    args.variant = args.variant or [("demo", {})]
    names = [n for n, _ in args.variant]
    if len(set(names)) != len(names):
        p.error(f"variant names repeat: {names}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dataset = "packaged:fashion-mnist" if fashion_mnist_available() else "packaged:mnist5k"
    built: dict[int, tuple[Path, dict]] = {}

    def data_for(images: int) -> tuple[Path, dict]:
        if images not in built:
            root = out / f"images_{images}"
            manifest_path = root / "data" / "manifest.json"
            if args.keep and manifest_path.is_file():
                built[images] = manifest_path, json.loads(manifest_path.read_text())
            else:
                built[images] = build_data(root, images)
        return built[images]

    rows, results = [], []
    for name, spec in args.variant:
        spec = dict(spec)
        steps, images = int(spec.pop("steps", args.steps)), int(spec.pop("images", args.images))
        manifest_path, manifest = data_for(images)
        t0 = time.time()
        run_dir = train(out, manifest_path, manifest["total_samples"], steps, dataset, run_config=spec,
                        run_name=f"run_{name}")
        minutes = (time.time() - t0) / 60
        top1 = evaluate(out, run_dir, dataset, args.eval_limit, shots=None)["zeroshot"]["metrics"]["top1"]
        results.append({"variant": name, "overrides": spec, "images": images, "kept": manifest["total_samples"],
                        "steps": steps, "top1": top1, "minutes": minutes,
                        "samples_per_s": train_throughput(run_dir)})
        base = results[0]
        rows.append([name, json.dumps(spec) if spec else "(none)", images, manifest["total_samples"], steps,
                     f"{100 * top1:.1f}%",
                     f"{100 * (top1 - base['top1']):+.1f} points", f"{minutes:.1f}",
                     results[-1]["samples_per_s"] or "-", f"{minutes / base['minutes']:.2f}x"])
        print(md_table(HEADERS, rows[-1:]).splitlines()[-1], flush=True)
        (out / "recipe.json").write_text(json.dumps(results, indent=2))  # after each: a long sweep keeps its rows
    text = (f"{machine_line('cpu')}\n# global batch 128 (unless a variant says otherwise), zero-shot on {dataset} "
            f"({args.eval_limit or 'all'} test images)\n\n{md_table(HEADERS, rows)}\n")
    (out / "recipe.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
