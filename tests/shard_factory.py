"""Test helper: small webdataset shards of real packaged images with class captions.

Writes ``<dir>/shards/NNNNN.tar`` (samples ``KEY.jpg`` RGB JPEG, ``KEY.txt`` caption,
``KEY.json`` metadata, optionally ``KEY.cls``) and ``<dir>/manifest.json`` in the data-build
format, optionally with damaged data to exercise the bad-sample paths.

    from shard_factory import make_caption_shards   # tests/ is on sys.path under pytest
    shards = make_caption_shards(tmp_path, n_shards=4, per_shard=32, image_px=64,
                                 corrupt={"jpeg": [3], "truncate": [1]})
    pattern, manifest = shards          # or shards.pattern, shards.manifest, shards.labels ...
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pretrain.packaged_data import load_packaged

TEMPLATES = ("a photo of a {}.", "a {} on a plain background.", "a black and white photo of a {}.")


@dataclass
class ShardSet:
    """What was written. Unpacks as ``pattern, manifest``."""

    pattern: str               # absolute braceexpand pattern of the shards
    manifest: Path             # <dir>/manifest.json
    shard_paths: list[Path]
    keys: list[str]            # every sample key written, in order
    labels: list[int]          # class index per key
    captions: list[str]        # caption per key
    classnames: list[str]
    corrupted_keys: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator:
        return iter((self.pattern, self.manifest))


def caption_for(classname: str, index: int) -> str:
    return TEMPLATES[index % len(TEMPLATES)].format(classname)


def encode_jpeg(img: np.ndarray, image_px: int, quality: int = 90) -> bytes:
    """Grey uint8 [H, W] -> RGB JPEG of image_px x image_px (bicubic upscale)."""
    pil = Image.fromarray(img).convert("RGB").resize((image_px, image_px), Image.BICUBIC)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def make_caption_shards(
    out_dir: str | Path,
    n_shards: int,
    per_shard: int | Sequence[int],
    image_px: int = 64,
    dataset: str = "fashion-mnist",
    split: str = "train",
    with_cls: bool = True,
    corrupt: dict[str, Sequence[int]] | None = None,
    seed: int = 0,
    key_prefix: str = "",
) -> ShardSet:
    """Write ``n_shards`` tars (``per_shard`` samples each, or a list of per-shard counts).

    ``corrupt`` damages data on purpose: ``{"jpeg": [sample indices]}`` replaces the JPEG
    bytes by garbage after a valid header, ``"missing_txt"`` / ``"missing_jpg"`` drop that
    member of those samples, ``"truncate": [shard indices]`` cuts those tars in the middle
    of a member (as an interrupted copy would). Sample indices count across all shards.
    """
    out_dir = Path(out_dir)
    shard_dir = out_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    counts = [per_shard] * n_shards if isinstance(per_shard, int) else list(per_shard)
    if len(counts) != n_shards:
        raise ValueError("per_shard list must have n_shards entries")
    corrupt = {k: set(v) for k, v in (corrupt or {}).items()}
    unknown = set(corrupt) - {"jpeg", "missing_txt", "missing_jpg", "truncate"}
    if unknown:
        raise ValueError(f"unknown corruption kinds {sorted(unknown)}")

    data = load_packaged(dataset, split)
    order = np.random.default_rng(seed).permutation(len(data))
    if sum(counts) > len(order):
        raise ValueError(f"{dataset}/{split} has only {len(order)} images")
    keys, labels, captions, corrupted, shard_paths, entries = [], [], [], [], [], []
    g = 0
    for s, count in enumerate(counts):
        path = shard_dir / f"{s:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for _ in range(count):
                idx = int(order[g])
                key = f"{key_prefix}{s:05d}{g:06d}"
                label = int(data.labels[idx])
                caption = caption_for(data.classnames[label], g)
                jpg = encode_jpeg(data.images[idx], image_px)
                if g in corrupt.get("jpeg", ()):
                    jpg = jpg[:200] + bytes(range(256)) * 8  # valid header, garbage scan data
                    corrupted.append(key)
                meta = {"url": f"packaged://{dataset}/{split}/{idx}", "caption": caption, "key": key,
                        "width": image_px, "height": image_px, "status": "success",
                        "sha256": hashlib.sha256(jpg).hexdigest(), "cls": label}
                if g not in corrupt.get("missing_jpg", ()):
                    _add(tar, f"{key}.jpg", jpg)
                else:
                    corrupted.append(key)
                if g not in corrupt.get("missing_txt", ()):
                    _add(tar, f"{key}.txt", caption.encode("utf-8"))
                else:
                    corrupted.append(key)
                _add(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
                if with_cls:
                    _add(tar, f"{key}.cls", str(label).encode("ascii"))
                keys.append(key)
                labels.append(label)
                captions.append(caption)
                g += 1
        if s in corrupt.get("truncate", ()):
            raw = path.read_bytes()
            path.write_bytes(raw[: len(raw) // 2 + 100])  # mid-member, not on a 512-byte block
        shard_paths.append(path)
        entries.append({"path": f"shards/{s:05d}.tar", "num_samples": count})
    last = n_shards - 1
    pattern = str(shard_dir / (f"{{00000..{last:05d}}}.tar" if n_shards > 1 else "00000.tar"))
    manifest = out_dir / "manifest.json"
    manifest.write_text(json.dumps({
        "shards": entries, "total_samples": sum(counts),
        "pattern": f"shards/{{00000..{last:05d}}}.tar" if n_shards > 1 else "shards/00000.tar",
        "source": f"packaged:{dataset}/{split}", "classnames": list(data.classnames),
    }, indent=1))
    return ShardSet(pattern, manifest, shard_paths, keys, labels, captions, list(data.classnames),
                    corrupted)
