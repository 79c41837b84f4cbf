"""Precision and recall of the pHash near-duplicate rule (``filter.dedup.phash_distance``)
on a labelled set built from Fashion-MNIST: low-texture garments on a flat background, the
hard case for a perceptual hash.

Each of N training images is made into the demo's 224 px RGB JPEG (the "original"), and
into copies that should count as the same picture (true pairs): JPEG re-encodes at quality
30 / 50 / 90, resized to 160 px and 112 px, cropped by 3 % and 6 % of each side, and a
semi-transparent text watermark. False pairs: every pair of two different originals (same
class or not). Distances are those of ``imagehash.phash``, as pass 1 computes them.
Precision = true pairs within t / all pairs within t; recall = true pairs within t / true pairs.

    .venv/bin/python benchmarks/bench_neardup_precision.py --images 2000
"""
from __future__ import annotations

import argparse
import gzip
import io
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageDraw

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
VARIANTS = ("jpeg_q30", "jpeg_q50", "jpeg_q90", "resize_160", "resize_112", "crop_3pct", "crop_6pct", "watermark")


def load_fmnist(n: int, path: Path = FMNIST) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    count, rows, cols = (int.from_bytes(raw[o:o + 4], "big") for o in (4, 8, 12))
    return np.frombuffer(raw, np.uint8, offset=16).reshape(count, rows, cols)[:n]


def _jpeg(img: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=q)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def original(a: np.ndarray) -> Image.Image:
    # as the demo serves them: upscaled to 224 px RGB, JPEG quality 90
    return _jpeg(Image.fromarray(a).resize((224, 224), Image.BICUBIC).convert("RGB"), 90)


def variant(img: Image.Image, name: str) -> Image.Image:
    w, h = img.size
    if name.startswith("jpeg_q"):
        return _jpeg(img, int(name[6:]))
    if name.startswith("resize_"):
        s = int(name[7:])
        return _jpeg(img.resize((s, s), Image.BICUBIC), 90)
    if name.startswith("crop_"):
        p = int(name[5:-3]) / 100
        dx, dy = round(w * p), round(h * p)
        return _jpeg(img.crop((dx, dy, w - dx, h - dy)), 90)
    if name == "watermark":
        over = Image.new("RGBA", img.size, (0, 0, 0, 0))
        d = ImageDraw.Draw(over)
        d.text((w * 0.55, h * 0.88), "(c) shop.example", fill=(255, 255, 255, 160))
        d.text((w * 0.05, h * 0.05), "SALE", fill=(255, 0, 0, 140))
        return _jpeg(Image.alpha_composite(img.convert("RGBA"), over).convert("RGB"), 90)
    raise ValueError(name)


def _hash(img: Image.Image) -> np.uint64:
    return np.uint64(int(str(imagehash.phash(img)), 16))


def labelled_distances(n: int) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """(false-pair distances over all pairs of originals, true-pair distances per variant,
    originals' hashes)."""
    from data_pipeline.filter.neardup import popcount64

    arrays = load_fmnist(n)
    origs = [original(a) for a in arrays]
    h0 = np.array([_hash(o) for o in origs], dtype=np.uint64)
    true = {v: np.array([int(popcount64(np.array([h0[i] ^ _hash(variant(o, v))], np.uint64))[0])
                         for i, o in enumerate(origs)]) for v in VARIANTS}
    i, j = np.triu_indices(n, 1)
    false = popcount64(h0[i] ^ h0[j])
    return false, true, h0


def table(false: np.ndarray, true: dict[str, np.ndarray], thresholds: list[int]) -> list[dict]:
    all_true = np.concatenate(list(true.values()))
    rows = []
    for t in thresholds:
        tp, fp = int((all_true <= t).sum()), int((false <= t).sum())
        rows.append({"t": t, "recall": tp / len(all_true), "precision": tp / max(1, tp + fp), "fp": fp,
                     "fp_rate": fp / len(false), **{v: float((d <= t).mean()) for v, d in true.items()}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--thresholds", type=int, nargs="+", default=[2, 4, 6, 8, 10, 12])
    a = ap.parse_args()
    false, true, _ = labelled_distances(a.images)
    print(f"{a.images} originals, {sum(len(v) for v in true.values()):,} true pairs, {len(false):,} false pairs")
    print("| t | precision | recall | false pairs within t (rate) | " + " | ".join(VARIANTS) + " |")
    print("|---" * (4 + len(VARIANTS)) + "|")
    for r in table(false, true, a.thresholds):
        print(f"| {r['t']} | {r['precision']:.4f} | {r['recall']:.3f} | {r['fp']:,} ({r['fp_rate']:.2e}) | "
              + " | ".join(f"{r[v]:.2f}" for v in VARIANTS) + " |")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
