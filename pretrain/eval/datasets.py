"""Evaluation datasets: labelled images for classification, captioned images for retrieval.

    from pretrain.eval import load_eval_dataset
    ds = load_eval_dataset("packaged:fashion-mnist", split="test", image_size=224)
    ds = load_eval_dataset("imagefolder:/data/pets")            # /data/pets/test/<class>/* if present
    ds = load_eval_dataset("wds:/data/val/{000..003}.tar")      # jpg + cls, classnames.json beside
    ds = load_eval_dataset("captions:/data/coco/manifest.json") # jpg + txt; several captions per image

Specs: ``packaged:NAME`` (``pretrain.packaged_data``), ``imagefolder:ROOT`` (one folder per
class; ``ROOT/<split>`` is used when it exists; ``classnames.txt|json`` in ROOT overrides the
folder names), ``wds:PATTERN`` (shards with ``jpg`` + ``cls``; class names from
``classnames.json``/``classnames.txt`` beside the first shard or the ``classnames``
argument), ``captions:PATTERN`` (``jpg`` + ``txt``; captions whose images have the same
sha256 -- the ``json`` field or the bytes -- belong to one image). In wds/captions patterns a
literal ``{split}`` is replaced by the split. ``limit`` keeps a fixed random subset (seed 0).
Item ``i`` is ``(tensor [3,H,W] or None when the image cannot be decoded, i)``.
"""
from __future__ import annotations

import abc

import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import numpy as np
import torch
from PIL import Image

from pretrain.eval import tario
from pretrain.eval.transforms import get_eval_transform
from pretrain.shards.images import checked_size

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_FILE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class ImageSource(abc.ABC):
    """Index -> PIL image; subclasses know where the pixels live."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def load(self, i: int) -> Image.Image: ...


@dataclass
class ArrayImages(ImageSource):
    arrays: np.ndarray  # uint8 [N,H,W] (grey) or [N,H,W,3]

    def __len__(self) -> int:
        return len(self.arrays)

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.arrays[i])


@dataclass
class FileImages(ImageSource):
    paths: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Image.Image:
        with fsspec.open(self.paths[i], "rb") as f:
            return _decode(f.read())


@dataclass
class TarImages(ImageSource):
    members: list[tario.Member]

    def __len__(self) -> int:
        return len(self.members)

    def load(self, i: int) -> Image.Image:
        return _decode(self.members[i].read())


def _decode(data: bytes) -> Image.Image:
    # Opened lazily: the transform may pick a reduced JPEG decode scale before pixels load;
    # a truncated or corrupt file fails inside __getitem__ and is skipped there. The shards'
    # pixel cap is checked from the header first, so a decompression bomb never decodes.
    checked_size(data)
    return Image.open(io.BytesIO(data))


@dataclass(eq=False)  # identity equality: fields hold arrays
class EvalDataset(torch.utils.data.Dataset):
    """Images plus either class labels or captions. ``fingerprint`` keys the feature cache."""

    name: str
    images: ImageSource
    fingerprint: str
    classnames: list[str] | None = None
    labels: np.ndarray | None = None          # classification: int64 [N]
    captions: list[str] | None = None         # retrieval: all captions
    text_to_image: np.ndarray | None = None   # retrieval: caption -> image index
    transform: Callable[[Image.Image], torch.Tensor] | None = None
    transform_id: str = ""
    problems: tario.Problems = field(default_factory=tario.Problems)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int]:
        if self.transform is None:
            raise RuntimeError("dataset has no transform: call set_image_size(model.image_size)")
        try:
            return self.transform(self.images.load(i)), i
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None, i  # counted by the feature extractor

    def set_image_size(self, image_size: int) -> EvalDataset:
        self.transform, self.transform_id = get_eval_transform(image_size)
        return self

    @property
    def is_retrieval(self) -> bool:
        return self.captions is not None


def _subset(n: int, limit: int | None) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    return np.sort(np.random.default_rng(0).choice(n, size=limit, replace=False))


def _hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _stat(url: str) -> tuple:
    try:
        info = fsspec.open(url).fs.info(url)
        return (url, info.get("size"), info.get("mtime") or info.get("LastModified") or info.get("ETag"))
    except (OSError, ValueError):
        return (url, None, None)


def _read_classnames(source: str | Sequence[str] | None, folder: str | None) -> list[str] | None:
    """An explicit list, a .json/.txt file, or classnames.json/.txt found in ``folder``."""
    if source is not None and not isinstance(source, str):
        return [str(c) for c in source]
    candidates = [source] if source else [f"{folder}/classnames.json", f"{folder}/classnames.txt"] if folder else []
    for path in candidates:
        fs, p = fsspec.core.url_to_fs(path)
        if not fs.exists(p):
            if source:
                raise FileNotFoundError(f"class-name file not found: {path}")
            continue
        with fs.open(p, "r", encoding="utf-8") as f:
            text = f.read()
        if path.endswith(".json"):
            data = json.loads(text)
            if isinstance(data, dict):  # {"0": "cat", "1": "dog"} -> ordered by index
                return [str(data[k]) for k in sorted(data, key=lambda k: int(k))]
            return [str(c) for c in data]
        return [ln.strip() for ln in text.splitlines() if ln.strip()]
    return None


def _load_packaged(name: str, split: str, limit: int | None) -> EvalDataset:
    from pretrain.packaged_data import load_packaged

    pd = load_packaged(name, split)
    keep = _subset(len(pd), limit)
    return EvalDataset(
        name=name, images=ArrayImages(pd.images[keep]), labels=pd.labels[keep].astype(np.int64),
        classnames=list(pd.classnames), fingerprint=_hash("packaged", name, split, limit, len(pd)),
    )


def _load_imagefolder(root: str, split: str, limit: int | None, classnames: str | Sequence[str] | None) -> EvalDataset:
    base = Path(root)
    top = base / split if (base / split).is_dir() else base
    folders = sorted(d.name for d in top.iterdir() if d.is_dir())
    if not folders:
        raise ValueError(f"imagefolder {top}: no class folders")
    paths, labels = [], []
    for c, folder in enumerate(folders):
        for dirpath, _, files in sorted(os.walk(top / folder)):
            for fn in sorted(files):
                if Path(fn).suffix.lower() in _FILE_EXTS:
                    paths.append(str(Path(dirpath) / fn))
                    labels.append(c)
    names = _read_classnames(classnames, str(base)) or [f.replace("_", " ") for f in folders]
    if len(names) != len(folders):
        raise ValueError(f"imagefolder {top}: {len(folders)} class folders but {len(names)} class names")
    keep = _subset(len(paths), limit)
    paths = [paths[i] for i in keep]
    return EvalDataset(
        name=base.name, images=FileImages(paths), labels=np.asarray(labels, dtype=np.int64)[keep],
        classnames=names, fingerprint=_hash("imagefolder", [_stat(p) for p in paths], names),
    )


def _image_member(sample: dict[str, tario.Member]) -> tario.Member | None:
    return next((sample[e] for e in _IMAGE_EXTS if e in sample), None)


def _load_wds(pattern: str, limit: int | None, classnames: str | Sequence[str] | None) -> EvalDataset:
    urls = tario.expand_shards(pattern)
    names = _read_classnames(classnames, tario.shards_dir(pattern))
    if names is None:
        raise FileNotFoundError(
            f"wds:{pattern}: no class names; put classnames.json or classnames.txt beside the shards "
            "or pass classnames= (--classnames)"
        )
    samples, problems = tario.index_shards(urls)
    members, labels = [], []
    for s in samples:
        img = _image_member(s)
        label_m = s.get("cls") or s.get("cls.txt") or s.get("label")
        if img is None or label_m is None:
            problems.add("missing_image_or_cls", str((img or label_m).url if (img or label_m) else "?"))
            continue
        try:
            label = int(tario.read_text(label_m))
        except (ValueError, OSError, UnicodeDecodeError) as e:
            problems.add("bad_cls", f"{label_m.url}@{label_m.offset}: {e}")
            continue
        if not 0 <= label < len(names):
            problems.add("cls_out_of_range", f"{label_m.url}@{label_m.offset}: {label} not in [0, {len(names)})")
            continue
        members.append(img)
        labels.append(label)
    keep = _subset(len(members), limit)
    return EvalDataset(
        name=tario.basename(tario.shards_dir(pattern)), images=TarImages([members[i] for i in keep]),
        labels=np.asarray(labels, dtype=np.int64)[keep], classnames=names, problems=problems,
        fingerprint=_hash("wds", [_stat(u) for u in urls], names, limit),
    )


def _load_captions(pattern: str, limit: int | None) -> EvalDataset:
    urls = tario.expand_shards(pattern)
    samples, problems = tario.index_shards(urls)
    image_of_group: dict[str, int] = {}
    members: list[tario.Member] = []
    captions: list[str] = []
    owner: list[int] = []
    for s in samples:
        img, txt = _image_member(s), s.get("txt")
        if img is None or txt is None:
            problems.add("missing_image_or_txt", str((img or txt).url if (img or txt) else "?"))
            continue
        try:
            caption = tario.read_text(txt)
            group = None
            if "json" in s:
                group = json.loads(s["json"].read().decode("utf-8")).get("sha256")
            group = group or hashlib.sha256(img.read()).hexdigest()
        except (OSError, ValueError, UnicodeDecodeError) as e:
            problems.add("unreadable_sample", f"{img.url}@{img.offset}: {e}")
            continue
        if group not in image_of_group:
            image_of_group[group] = len(members)
            members.append(img)
        captions.append(caption)
        owner.append(image_of_group[group])
    keep = _subset(len(members), limit)  # a subset of images keeps all their captions
    new_index = {int(old): new for new, old in enumerate(keep)}
    pairs = [(c, new_index[o]) for c, o in zip(captions, owner) if o in new_index]
    return EvalDataset(
        name=tario.basename(tario.shards_dir(pattern)), images=TarImages([members[i] for i in keep]),
        captions=[c for c, _ in pairs], text_to_image=np.asarray([o for _, o in pairs], dtype=np.int64),
        problems=problems, fingerprint=_hash("captions", [_stat(u) for u in urls], limit),
    )


def load_eval_dataset(
    spec: str,
    split: str = "test",
    image_size: int | None = None,
    limit: int | None = None,
    classnames: str | Sequence[str] | None = None,
) -> EvalDataset:
    """Load an eval set from ``spec`` (see the module docstring). ``image_size=None`` leaves the
    transform unset; the eval functions then use the model's ``image_size``."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ValueError(f"dataset spec {spec!r} must look like KIND:VALUE (packaged, imagefolder, wds, captions)")
    rest = rest.replace("{split}", split)
    if kind == "packaged":
        ds = _load_packaged(rest, split, limit)
    elif kind == "imagefolder":
        ds = _load_imagefolder(rest, split, limit, classnames)
    elif kind == "wds":
        ds = _load_wds(rest, limit, classnames)
    elif kind == "captions":
        ds = _load_captions(rest, limit)
    else:
        raise ValueError(f"unknown dataset kind {kind!r} in {spec!r}: use packaged, imagefolder, wds or captions")
    if len(ds) == 0:
        raise ValueError(f"dataset {spec!r} (split {split!r}) has no usable samples; problems: {ds.problems.counts}")
    if image_size is not None:
        ds.set_image_size(image_size)
    return ds
