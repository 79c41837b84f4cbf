"""Helpers for the filter tests: real Fashion-MNIST images written with PIL into small
webdataset tars laid out like img2dataset's output (key.jpg / key.txt / key.json).
Holds no tests itself."""
from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import zlib
from functools import lru_cache

import numpy as np
from PIL import Image

from pretrain.packaged_data import FASHION_MNIST_CLASSES, load_packaged


@lru_cache(maxsize=1)
def _fmnist():
    return load_packaged("fashion-mnist", "test")


def real_image(i: int) -> np.ndarray:
    return _fmnist().images[i]


def real_caption(i: int) -> str:
    return f"a photo of a {FASHION_MNIST_CLASSES[int(_fmnist().labels[i])]} number {i}"


def encode(arr: np.ndarray, size: int | tuple[int, int] = 256, fmt: str = "JPEG", quality: int = 90) -> bytes:
    """Upscale a 28x28 grey image to RGB of ``size`` (like img2dataset's resize) and encode."""
    wh = (size, size) if isinstance(size, int) else size
    img = Image.fromarray(arr).convert("RGB").resize(wh, Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares width x height (8-bit grey): a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    # One row of zeros only: the rest of the declared pixels would be decoded into memory.
    idat = zlib.compress(b"\x00" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def sample(key: str, image: bytes | None, caption: bytes | str | None, url: str | None = None,
           with_sha: bool = True, ext: str = "jpg", extra: dict | None = None) -> dict:
    """One sample as img2dataset writes it (json has url, caption, key, status, sizes, sha256)."""
    cap = caption.encode("utf-8") if isinstance(caption, str) else caption
    meta = {"url": url if url is not None else f"http://example.com/{key}.jpg",
            "caption": caption if isinstance(caption, str) else None,
            "key": key, "status": "success", "error_message": None}
    if image:
        try:
            w, h = Image.open(io.BytesIO(image)).size
        except Exception:
            w = h = None
        meta.update(width=w, height=h, original_width=w, original_height=h)
    if with_sha and image is not None:
        meta["sha256"] = hashlib.sha256(image).hexdigest()
    meta.update(extra or {})
    parts: dict[str, bytes] = {"json": json.dumps(meta).encode()}
    if image is not None:
        parts[ext] = image
    if cap is not None:
        parts["txt"] = cap
    return {"key": key, "parts": parts}


def write_tar(path, samples: list[dict]) -> str:
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for ext in sorted(s["parts"]):
                data = s["parts"][ext]
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tf.addfile(info, io.BytesIO(data))
    return str(path)


def good(key: str, i: int, **kw) -> dict:
    """A sample that passes every per-sample rule (Fashion-MNIST image i, 256 px)."""
    return sample(key, encode(real_image(i)), real_caption(i), **kw)


def phash_int(data: bytes) -> int:
    import imagehash

    return int(str(imagehash.phash(Image.open(io.BytesIO(data)).convert("RGB"))), 16)


@lru_cache(maxsize=4)
def distinct_indices(n: int, min_distance: int = 10) -> tuple[int, ...]:
    """n Fashion-MNIST test indices whose 256-px JPEGs are pairwise more than min_distance
    apart in pHash: images the near-duplicate rule must keep."""
    picked: list[int] = []
    hashes: list[int] = []
    i = 0
    while len(picked) < n:
        h = phash_int(encode(real_image(i)))
        if all(bin(h ^ o).count("1") > min_distance for o in hashes):
            picked.append(i)
            hashes.append(h)
        i += 1
    return tuple(picked)
