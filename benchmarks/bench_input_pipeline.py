"""Input-pipeline throughput: samples/s of read + decode + random square crop + normalise +
tokenize through ``pretrain.data.make_train_loader``, on webdataset shards of 256 px and
512 px JPEGs, with and without the reduced-size (DCT-scaled) JPEG decode.

    .venv/bin/python benchmarks/bench_input_pipeline.py [--workers 2] [--samples 3072]
        [--image-size 224] [--micro-batch 64] [--shard-dir /tmp/bench_input_shards]

The shards are mosaics of real Fashion-MNIST images (4 x 4 tiles, per-tile colour tint,
mild sensor noise) so the JPEGs carry photo-like detail; ``make_bench_shards`` is meant to be
reused by the open_clip side of this benchmark so both read the same files. Throughput is
measured after the first batch (worker start-up and shuffle-buffer fill excluded; both are
printed separately); each setting runs ``--repeats`` times, alternating, and the best run
is reported. Numbers depend on the machine's load: run on an idle machine.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from pretrain.data import DataSource, make_train_loader
from pretrain.packaged_data import FASHION_MNIST_CLASSES, load_packaged


def _mosaic(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, px: int) -> tuple[bytes, str]:
    tiles, k = [], 4
    picks = rng.integers(0, len(images), size=k * k)
    for i in picks:
        tint = rng.uniform(0.4, 1.0, size=3)
        tiles.append(images[i][..., None] * tint)
    rows = [np.concatenate(tiles[r * k:(r + 1) * k], axis=1) for r in range(k)]
    grid = np.concatenate(rows, axis=0).astype(np.float32)
    img = Image.fromarray(grid.clip(0, 255).astype(np.uint8)).resize((px, px), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, size=(px, px, 3))
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    names = sorted({FASHION_MNIST_CLASSES[labels[i]] for i in picks[:3]})
    return buf.getvalue(), "a photo of a " + ", a ".join(names) + "."


def make_bench_shards(out_dir: Path, px: int, n_samples: int, per_shard: int = 256) -> str:
    """Write (once) shards of px x px JPEG mosaics with captions; return the brace pattern."""
    out_dir = Path(out_dir)
    n_shards = (n_samples + per_shard - 1) // per_shard
    pattern = str(out_dir / f"{{00000..{n_shards - 1:05d}}}.tar")
    done = out_dir / "done.json"
    if done.is_file() and json.loads(done.read_text()) == {"px": px, "n": n_samples, "per": per_shard}:
        return pattern
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = load_packaged("fashion-mnist", "train")
    rng = np.random.default_rng(px)
    g = 0
    for s in range(n_shards):
        with tarfile.open(out_dir / f"{s:05d}.tar", "w") as tar:
            for _ in range(min(per_shard, n_samples - g)):
                jpg, caption = _mosaic(ds.images, ds.labels, rng, px)
                for ext, data in (("jpg", jpg), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{g:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                g += 1
    done.write_text(json.dumps({"px": px, "n": n_samples, "per": per_shard}))
    return pattern


def measure(pattern: str, *, reduced: bool, workers: int, image_size: int, micro_batch: int,
            n_samples: int, tokenizer) -> dict:
    steps = n_samples // micro_batch
    loader = make_train_loader(
        [DataSource(pattern)], tokenizer=tokenizer, image_size=image_size, micro_batch=micro_batch,
        num_workers=workers, seed=0, epoch=0, rank=0, world_size=1, steps=steps, resampled=False,
        shuffle_buffer=micro_batch, reduced_decode=reduced)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    rest = sum(1 for _ in it)
    t2 = time.perf_counter()
    return {"first_batch_s": t1 - t0, "samples_per_s": rest * micro_batch / (t2 - t1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=3072)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--sizes", default="256,512", help="stored JPEG sizes (px), comma-separated")
    ap.add_argument("--shard-dir", default="/tmp/bench_input_shards")
    ap.add_argument("--repeats", type=int, default=2,
                    help="runs per setting, alternating on/off; the best is reported (load noise)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pretrain.tokenizer import default_tokenizer

    tok = default_tokenizer()
    print(f"# input pipeline: {args.workers} workers, image_size {args.image_size}, micro-batch "
          f"{args.micro_batch}, {args.samples} samples per run, load avg {os.getloadavg()[0]:.2f}")
    print("| stored px | reduced decode | samples/s | first batch (s) |")
    print("|---|---|---|---|")
    for px in (int(p) for p in args.sizes.split(",")):
        pattern = make_bench_shards(Path(args.shard_dir) / f"px{px}", px, args.samples)
        best: dict[bool, dict] = {}
        for _ in range(args.repeats):
            for reduced in (False, True):
                r = measure(pattern, reduced=reduced, workers=args.workers, image_size=args.image_size,
                            micro_batch=args.micro_batch, n_samples=args.samples, tokenizer=tok)
                if reduced not in best or r["samples_per_s"] > best[reduced]["samples_per_s"]:
                    best[reduced] = r
        rates = {k: v["samples_per_s"] for k, v in best.items()}
        for reduced in (False, True):
            print(f"| {px} | {'on' if reduced else 'off'} | {rates[reduced]:.0f} | "
                  f"{best[reduced]['first_batch_s']:.2f} |", flush=True)
        print(f"| {px} | ratio on/off | {rates[True] / rates[False]:.2f}x | |")


if __name__ == "__main__":
    main()
