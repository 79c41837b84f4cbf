"""The demo's embedded default "web": real Fashion-MNIST photos behind a local URL list.

Training images are upscaled from 28 px to RGB JPEGs, each paired with a generated
natural-language caption (``captions.py``), plus realistic noise that the data build must
cope with: mismatched captions, duplicate URLs, the same image under a second URL, links to
missing files (404), truncated JPEGs, boilerplate/empty captions, and a few images of the
test split (a web crawl holds copies of public evaluation sets), which the build's
decontamination against ``write_eval_images``'s folder must drop.
The files are served by ``data_pipeline.serve`` on 127.0.0.1; ``write_url_list`` writes
the parquet URL list pointing at the server.

    web = build_web_files("demo_out/web", n_images=24000, image_px=224, seed=0)
    write_url_list(web, "http://127.0.0.1:PORT", "demo_out/urls.parquet")
    write_eval_images("demo_out/eval_images")     # the test split, for filter.eval_overlap
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pretrain.demo.captions import caption_for
from pretrain.packaged_data import default_fashion_like


@dataclass
class NoiseRates:
    """Fractions of URL-list rows that carry each kind of noise."""

    mismatched_caption: float = 0.05
    duplicate_url: float = 0.02
    same_image_other_url: float = 0.02
    missing_file: float = 0.01
    truncated_jpeg: float = 0.01
    boilerplate_caption: float = 0.01
    test_split_image: float = 0.005  # per training image: one of the test split, planted


@dataclass
class WebFiles:
    root: str
    dataset: str
    classnames: list[str]
    rows: list[dict] = field(default_factory=list)  # path (relative to root), caption, label, noise
    noise_counts: dict[str, int] = field(default_factory=dict)


_BOILERPLATE = ["IMG_{:04d}.JPG", "DSC{:05d}.jpg", "image", "", "   ", "untitled"]


def _jpeg(img28: np.ndarray, px: int, quality: int = 90) -> bytes:
    rgb = Image.fromarray(img28, mode="L").resize((px, px), Image.BICUBIC).convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def build_web_files(root: str | Path, n_images: int, image_px: int = 224, seed: int = 0,
                    noise: NoiseRates | None = None) -> WebFiles:
    """Write ``n_images`` training images (+ noisy extras) under ``root/img`` and return the rows."""
    noise = noise or NoiseRates()
    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    ds = default_fashion_like("train")
    rng = random.Random(seed)
    order = np.random.default_rng(seed).permutation(len(ds))[:n_images]
    web = WebFiles(root=str(root), dataset=ds.name, classnames=ds.classnames)
    counts = {k: 0 for k in asdict(noise)}

    for i, idx in enumerate(order):
        label = int(ds.labels[idx])
        rel = f"img/{i:06d}.jpg"
        data = _jpeg(ds.images[idx], image_px)
        kind = "clean"
        r = rng.random()
        caption_label = label
        if r < noise.mismatched_caption:
            kind, caption_label = "mismatched_caption", (label + rng.randrange(1, len(ds.classnames))) % len(ds.classnames)
        elif r < noise.mismatched_caption + noise.truncated_jpeg:
            kind, data = "truncated_jpeg", data[: len(data) // 2]
        (root / rel).write_bytes(data)
        caption = caption_for(caption_label, ds.classnames, rng)
        if kind == "clean" and rng.random() < noise.boilerplate_caption:
            kind, caption = "boilerplate_caption", rng.choice(_BOILERPLATE).format(rng.randrange(10000))
        if kind != "clean":
            counts[kind] += 1
        web.rows.append({"path": rel, "caption": caption, "label": label, "noise": kind})

        if rng.random() < noise.duplicate_url:
            counts["duplicate_url"] += 1
            web.rows.append({"path": rel, "caption": caption, "label": label, "noise": "duplicate_url"})
        if rng.random() < noise.same_image_other_url:
            counts["same_image_other_url"] += 1
            copy = f"img/{i:06d}_copy.jpg"
            (root / copy).write_bytes(data)
            web.rows.append({"path": copy, "caption": caption_for(label, ds.classnames, rng),
                             "label": label, "noise": "same_image_other_url"})
        if rng.random() < noise.missing_file:
            counts["missing_file"] += 1
            web.rows.append({"path": f"img/missing_{i:06d}.jpg", "caption": caption_for(label, ds.classnames, rng),
                             "label": label, "noise": "missing_file"})
    # Drawn apart from the loop's generator, so the rest of the web does not change with it.
    test = default_fashion_like("test")
    n_test = int(round(noise.test_split_image * n_images))
    for j, idx in enumerate(np.random.default_rng(seed + 1).choice(len(test), n_test, replace=False)):
        label = int(test.labels[idx])
        rel = f"img/t{j:05d}.jpg"
        (root / rel).write_bytes(_jpeg(test.images[idx], image_px))
        web.rows.append({"path": rel, "caption": caption_for(label, ds.classnames, rng), "label": label,
                         "noise": "test_split_image", "test_index": int(idx)})
    counts["test_split_image"] = n_test
    web.noise_counts = counts
    (root / "web.json").write_text(json.dumps({"dataset": web.dataset, "classnames": web.classnames,
                                               "n_rows": len(web.rows), "noise": counts}, indent=2))
    return web


def write_eval_images(folder: str | Path, split: str = "test") -> Path:
    """Every image of the demo dataset's ``split`` as a 28 px grey PNG (as the dataset ships
    it; ~1 KB and well under a millisecond to hash each), for ``filter.eval_overlap``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ds = default_fashion_like(split)
    for i, img in enumerate(ds.images):
        Image.fromarray(img, mode="L").save(folder / f"{i:05d}.png")
    return folder


def write_url_list(web: WebFiles, base_url: str, path: str | Path) -> Path:
    """A parquet URL list (url, caption, label, noise) pointing at ``base_url``."""
    df = pd.DataFrame(web.rows).drop(columns=["test_index"], errors="ignore")
    df.insert(0, "url", base_url.rstrip("/") + "/" + df.pop("path"))
    path = Path(path)
    df.to_parquet(path, index=False)
    return path
