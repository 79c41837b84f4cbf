"""Benchmark: the whole data build vs plain img2dataset alone, and the filter stage alone.

Serves N real images (Fashion-MNIST, upscaled, as JPEG/PNG) from a local HTTP server, then
in one run and on the same input:
  1. plain ``img2dataset`` (its CLI, same processes/threads/resize settings) -> samples/s
  2. ``python -m data_pipeline build`` (prepare + crawl + filter + shard)    -> samples/s
  3. the filter stage alone (``filter_stage``) with 1 and with P processes  -> samples/s per process
Prints the numbers and the build/img2dataset ratio. Wall-clock includes each command's
start-up, as a user would see it.

    .venv/bin/python benchmarks/bench_build.py [--n 600] [--processes 2] [--threads 16]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.serve import ImageServer  # noqa: E402
from pretrain.packaged_data import FASHION_MNIST_CLASSES, fashion_mnist_available, load_packaged  # noqa: E402

PHRASES = ["a photo of a {c}", "studio shot of a {c} on a plain background", "black and white {c}, product photo",
           "my new {c} from the shop", "close-up of a {c}"]


def make_site(root: Path, n: int) -> pd.DataFrame:
    ds = load_packaged("fashion-mnist" if fashion_mnist_available() else "mnist5k", "train")
    classes = FASHION_MNIST_CLASSES if ds.name == "fashion-mnist" else ds.classnames
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        size = (224, 256, 288)[i % 3]
        im = Image.fromarray(ds.images[i]).resize((size, size), Image.BICUBIC)
        if i % 2:
            im = im.convert("RGB")
        b = io.BytesIO()
        fmt, ext = ("JPEG", "jpg") if i % 4 else ("PNG", "png")
        im.save(b, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        (root / f"{i:06d}.{ext}").write_bytes(b.getvalue())
        rows.append((f"{i:06d}.{ext}", PHRASES[i % len(PHRASES)].format(c=classes[int(ds.labels[i])])))
    return pd.DataFrame(rows, columns=["path", "caption"])


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=100, help="URLs per crawl tar")
    args = ap.parse_args()
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        site = make_site(tmp / "site", args.n)
        with ImageServer(tmp / "site") as srv:
            urls = tmp / "urls.parquet"
            pd.DataFrame({"url": [srv.url(p) for p in site["path"]], "caption": site["caption"]}).to_parquet(urls)
            common = dict(image_size=256, resize_mode="keep_ratio", resize_only_if_bigger=True, encode_quality=95,
                          timeout=10, thread_count=args.threads, processes_count=args.processes,
                          number_sample_per_shard=args.shard_size)
            i2d = [str(Path(sys.executable).with_name("img2dataset")), f"--url_list={urls}", "--input_format=parquet",
                   "--url_col=url", "--caption_col=caption", "--output_format=webdataset", "--compute_hash=sha256",
                   "--extract_exif=False", f"--output_folder={tmp / 'i2d'}"] + [f"--{k}={v}" for k, v in common.items()]
            t_i2d = timed(i2d, env)
            build = [sys.executable, "-m", "data_pipeline", "build", "--urls", str(urls), "--output", str(tmp / "build"),
                     f"--processes={args.processes}", f"--crawl.thread_count={args.threads}",
                     f"--crawl.number_sample_per_shard={args.shard_size}", "--allow-private-addresses",
                     "--shard.samples_per_shard=1000"]
            t_build = timed(build, env)
        stats = json.loads((tmp / "build" / "stats.json").read_text())
        timings = stats["timings_s"]
        tars = sorted(str(p) for p in (tmp / "build" / "crawl").glob("*.tar"))
        n_in = json.loads((tmp / "build" / "filter" / "result.json").read_text())["total_in"]
        filter_rates = {}
        for p in sorted({1, args.processes}):
            code = ("import sys, time; sys.path.insert(0, %r)\n"
                    "from data_pipeline.config import BuildConfig\n"
                    "from data_pipeline.filter import filter_stage\n"
                    "if __name__ == '__main__':\n"
                    "    t0 = time.perf_counter()\n"
                    "    filter_stage(%r, %r, BuildConfig().filter, %d)\n"
                    "    print(time.perf_counter() - t0)\n") % (str(ROOT), tars, str(tmp / f"filter_p{p}"), p)
            script = tmp / f"filter_p{p}.py"
            script.write_text(code)
            r = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
            secs = float(r.stdout.strip().splitlines()[-1])
            filter_rates[p] = (secs, n_in / secs / p)
    print(f"samples: {args.n} URLs, processes={args.processes}, threads={args.threads}, cpus={os.cpu_count()}")
    print(f"plain img2dataset      : {t_i2d:7.1f} s  {args.n / t_i2d:7.1f} samples/s")
    print(f"clip-data build (all)  : {t_build:7.1f} s  {args.n / t_build:7.1f} samples/s "
          f"(crawl {timings.get('crawl', 0):.1f} s, filter {timings.get('filter', 0):.1f} s, "
          f"shard {timings.get('shard', 0):.1f} s; kept {stats['kept']})")
    print(f"ratio build / img2dataset throughput: {t_i2d / t_build:.2f}")
    for p, (secs, rate) in filter_rates.items():
        print(f"filter stage, {p} process(es): {secs:6.1f} s for {n_in} samples = {rate:7.1f} samples/s per process")


if __name__ == "__main__":
    main()
