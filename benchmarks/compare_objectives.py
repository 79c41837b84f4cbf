"""The CLIP paper's efficiency experiment (arXiv 2103.00020, Figure 2) on the embedded demo
data: the contrastive objective against the bag-of-words and captioning baselines, same
image tower, data, batch and number of images seen, zero-shot accuracy against images seen.

    .venv/bin/python benchmarks/compare_objectives.py [--out compare_out] [--steps 120] ...

1. builds the demo's data once (pretrain/demo: the embedded "web" of Fashion-MNIST photos
   with generated captions, crawled by the data build; `--keep` reuses it);
2. trains each objective with `deepspeed pretrain/run.py` (2 CPU processes, ZeRO-1, the
   demo's run config `pretrain/demo/demo.yaml`), only `train.loss` differing: "clip",
   "bow" (softmax over the caption's normalised bag of words), "captioning" (text decoder
   with cross-attention to the ViT's tokens); each run evaluates zero-shot every
   `--eval-every` steps on the same held-out test images with the same prompt ensemble;
3. writes `<out>/objectives.png` (top-1 against images seen), `<out>/objectives.md` (the
   table and the efficiency ratios) and `<out>/objectives.json`.

Efficiency ratio at a fixed accuracy: for a pair (slower, faster) the accuracy level is the
best top-1 the slower objective reached; the images each objective needed to first reach
it (linear interpolation between evaluations) give ratio = images(slower) / images(faster),
the paper's "3x" (bag of words over captioning) and "4x" (contrastive over bag of words).
A faster curve already at that level at its first evaluation gives a lower bound (">=");
so does a slower curve that never gets clearly above chance (1.5x): the level is then 1.5x
chance and the slower objective is charged every image it saw.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_line, md_table  # noqa: E402

from pretrain.demo.main import HERE as DEMO_DIR  # noqa: E402
from pretrain.demo.main import _bin, _run, build_data  # noqa: E402
from pretrain.packaged_data import fashion_mnist_available  # noqa: E402
from pretrain.train.distributed import free_port  # noqa: E402

OBJECTIVES = {"clip": "contrastive (CLIP)", "bow": "bag of words", "captioning": "captioning"}
PAPER = {("captioning", "bow"): 3.0, ("bow", "clip"): 4.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="compare_out")
    p.add_argument("--images", type=int, default=4000, help="training images served by the demo's local web")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per objective")
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=30, help="zero-shot evaluation every N steps (and at the end)")
    p.add_argument("--eval-limit", type=int, default=100, help="held-out test images per evaluation")
    p.add_argument("--templates", default="auto", help="prompt ensemble for every objective (templates.py)")
    p.add_argument("--objectives", default="clip,bow,captioning")
    p.add_argument("--keep", action="store_true", help="reuse built data and finished runs in --out")
    return p.parse_args(argv)


def run_config(out: Path, loss: str, manifest: Path, n_kept: int, args, dataset: str) -> Path:
    cfg = yaml.safe_load((DEMO_DIR / "demo.yaml").read_text())
    gb = args.global_batch
    cfg["output_dir"] = str(out / "runs" / loss)
    cfg["data"]["sources"] = [{"url": str(manifest), "weight": 1.0}]
    cfg["data"]["samples_per_epoch"] = max(gb, (n_kept // gb) * gb)
    cfg["train"].update(loss=loss, global_batch=gb, micro_batch=gb // 2,
                        epochs=math.ceil(args.steps / (cfg["data"]["samples_per_epoch"] // gb)),
                        max_steps=args.steps)
    cfg["schedule"]["warmup_steps"] = min(cfg["schedule"]["warmup_steps"], max(0, args.steps // 10))
    cfg["checkpoint"].update(every_steps=args.steps, keep_last=1)
    cfg["eval"].update(every_steps=args.eval_every, zeroshot_dataset=dataset, limit=args.eval_limit,
                       templates=args.templates)
    cfg["logging"].update(every_steps=max(1, min(10, args.steps // 10)), experiment="compare-objectives")
    path = out / f"run_{loss}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train(cfg_path: Path) -> float:
    start = time.time()
    _run([_bin("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
          str(REPO / "pretrain" / "run.py"), "--config", str(cfg_path)], env={"OMP_NUM_THREADS": "1"})
    return time.time() - start


def curve(run_dir: Path, global_batch: int) -> list[tuple[int, float]]:
    """[(images seen, zero-shot top-1)] from the run's eval/step_N.json files."""
    points = []
    for path in sorted((run_dir / "eval").glob("step_*.json")):
        rec = json.loads(path.read_text())
        points.append((int(rec["step"]) * global_batch, float(rec["zeroshot"]["top1"])))
    return points


def images_to_reach(points: list[tuple[int, float]], level: float) -> tuple[float | None, bool]:
    """(images seen when the curve first reaches `level`, interpolated; exact=False when it is
    reached at the first evaluation already (an upper bound), None when never)."""
    prev = None
    for images, acc in points:
        if acc >= level:
            if prev is None:
                return float(images), False
            (i0, a0) = prev
            frac = (level - a0) / (acc - a0) if acc > a0 else 1.0
            return i0 + frac * (images - i0), True
        prev = (images, acc)
    return None, True


def ratio(curves: dict, slow: str, fast: str, chance: float) -> dict:
    """The images `slow` needs over those `fast` needs to reach the best top-1 `slow`
    reached. When `slow` never gets clearly above chance (1.5x), the level is 1.5x chance
    and, if `fast` reaches it, the ratio is a lower bound: `slow` needs more than every
    image it saw."""
    if slow not in curves or fast not in curves or not curves[slow] or not curves[fast]:
        return {}
    floor = 1.5 * chance
    best = max(a for _, a in curves[slow])
    level = max(best, floor)
    slow_images, _ = images_to_reach(curves[slow], level)
    beyond = slow_images is None
    if beyond:
        slow_images = float(curves[slow][-1][0])
    fast_images, exact = images_to_reach(curves[fast], level)
    if fast_images is None:
        return {"level": level, "ratio": None, "note": f"neither reaches {100 * level:.1f}%" if beyond
                else f"{fast} never reaches {100 * level:.1f}%"}
    return {"level": level, "slow_images": slow_images, "fast_images": fast_images,
            "ratio": slow_images / fast_images, "lower_bound": beyond or not exact,
            "note": f"{slow} never reaches it in {slow_images:.0f} images" if beyond else ""}


def plot(curves: dict, ratios: dict, path: Path, chance: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for loss, pts in curves.items():
        ax.plot([i for i, _ in pts], [100 * a for _, a in pts], marker="o", label=OBJECTIVES[loss])
    ax.axhline(100 * chance, color="grey", linestyle=":", label="chance")
    text = [f"{OBJECTIVES[f]} over {OBJECTIVES[s]}: {r['ratio']:.1f}x" + (" (>=)" if r.get("lower_bound") else "")
            for (s, f), r in ratios.items() if r.get("ratio")]
    if text:
        ax.text(0.02, 0.97, "\n".join(text), transform=ax.transAxes, va="top", fontsize=9)
    ax.set_xlabel("images seen")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(curves: dict, ratios: dict, args, seconds: dict, machine: str, dataset: str, n_kept: int) -> str:
    steps = sorted({i for pts in curves.values() for i, _ in pts})
    rows = [[OBJECTIVES[loss]] + [next((f"{100 * a:.1f}" for i, a in pts if i == s), "-") for s in steps]
            + [f"{seconds.get(loss, 0) / 60:.1f}"] for loss, pts in curves.items()]
    lines = [machine, "",
             f"Zero-shot top-1 (%) on {args.eval_limit} held-out {dataset.split(':')[-1]} test images "
             f"(prompt ensemble `{args.templates}`), ViT-tiny at 32 px, global batch {args.global_batch}, "
             f"{args.steps} steps, {n_kept} training pairs from the demo's data build, 2 CPU ranks, ZeRO-1, fp32:",
             "", md_table(["objective"] + [f"{s} images" for s in steps] + ["train+eval min"], rows), "",
             "| ratio (images to the same accuracy) | level (top-1) | ours | paper |", "|---|---|---|---|"]
    for (slow, fast), r in ratios.items():
        if not r:
            continue
        ours = "n/a (" + r["note"] + ")" if r.get("ratio") is None else \
            (">= " if r["lower_bound"] else "") + f"{r['ratio']:.2f}x ({r['slow_images']:.0f} vs {r['fast_images']:.0f}" \
            + (f"; {r['note']})" if r["note"] else ")")
        lines.append(f"| {OBJECTIVES[fast]} over {OBJECTIVES[slow]} | {100 * r['level']:.1f}% | {ours} | "
                     f"{PAPER[(slow, fast)]:.0f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    losses = [s for s in args.objectives.split(",") if s]
    unknown = sorted(set(losses) - set(OBJECTIVES))
    if unknown:
        raise SystemExit(f"unknown objective(s) {unknown}; choose from {list(OBJECTIVES)}")
    dataset = "packaged:fashion-mnist" if fashion_mnist_available() else "packaged:mnist5k"
    manifest = out / "data" / "manifest.json"
    t0 = time.time()
    if not (args.keep and manifest.is_file()):
        manifest, _ = build_data(out, args.images)
    n_kept = json.loads(manifest.read_text())["total_samples"]
    data_s = time.time() - t0
    curves, seconds = {}, {}
    earlier = out / "objectives.json"
    if args.keep and earlier.is_file():  # the kept runs' times, from the run that trained them
        seconds.update(json.loads(earlier.read_text()).get("seconds", {}))
    for loss in losses:
        run_dir = out / "runs" / loss
        done = (run_dir / "eval" / f"step_{args.steps:08d}.json").is_file()
        if not (args.keep and done):
            if run_dir.exists():
                import shutil

                shutil.rmtree(run_dir)
            seconds[loss] = train(run_config(out, loss, manifest, n_kept, args, dataset))
        curves[loss] = curve(run_dir, args.global_batch)
    n_classes = 10
    chance = 1.0 / n_classes
    ratios = {pair: ratio(curves, *pair, chance) for pair in PAPER}
    machine = machine_line()
    title = f"zero-shot {dataset.split(':')[-1]} vs images seen (ViT-tiny, batch {args.global_batch})"
    plot(curves, ratios, out / "objectives.png", chance, title)
    md = markdown(curves, ratios, args, seconds, machine, dataset, n_kept)
    (out / "objectives.md").write_text(md)
    (out / "objectives.json").write_text(json.dumps(
        {"curves": curves, "ratios": {f"{f}_over_{s}": r for (s, f), r in ratios.items()},
         "seconds": seconds, "data_seconds": data_s, "args": vars(args), "machine": machine}, indent=1))
    print(md)
    print(f"plot: {out / 'objectives.png'}; total {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
