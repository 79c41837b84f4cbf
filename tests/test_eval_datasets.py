"""Eval datasets of pretrain.eval: webdataset shards (class and caption), image folders,
packaged sets, bad-sample skipping and the feature cache; answers checked with stub towers.

    .venv/bin/python -m pytest -q tests/test_eval_datasets.py
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_eval_stubs import ColourCLIP
from pretrain.eval import load_eval_dataset, retrieval_eval, zeroshot_eval
from pretrain.eval.features import FeatureCache, FeatureSet, extract_image_features

RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def _jpg(colour: tuple[int, int, int], size: tuple[int, int] = (12, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _stub() -> ColourCLIP:
    table = {name: [c / 255 for c in rgb] for name, rgb in RGB.items()}
    return ColourCLIP(table, keywords=list(RGB))


def test_wds_classification_skips_and_counts_bad_samples(tmp_path: Path) -> None:
    names = list(RGB)
    good = [(f"s{i:03d}", {"jpg": _jpg(RGB[names[i % 3]]), "cls": str(i % 3).encode()}) for i in range(9)]
    bad = [
        ("corrupt", {"jpg": b"\xff\xd8\xff not a jpeg", "cls": b"0"}),   # decodes badly -> skipped at read
        ("nolabel", {"jpg": _jpg(RGB["red"])}),                          # no cls -> skipped at index
        ("badcls", {"jpg": _jpg(RGB["red"]), "cls": b"seven"}),
        ("outofrange", {"jpg": _jpg(RGB["red"]), "cls": b"3"}),
    ]
    _write_tar(tmp_path / "000.tar", good[:5] + bad)
    _write_tar(tmp_path / "001.tar", good[5:])
    # 002: a copy of 001 cut inside its second sample. One sample = jpg (header + 2 blocks)
    # + cls (header + 1 block) = 5 blocks, so the cut keeps s005 whole and s006's jpg header.
    assert len(good[5][1]["jpg"]) <= 1024
    (tmp_path / "002.tar").write_bytes((tmp_path / "001.tar").read_bytes()[:5 * 512 + 512 + 300])
    # 003: cut exactly at a header boundary (tarfile itself would not notice)
    (tmp_path / "003.tar").write_bytes((tmp_path / "001.tar").read_bytes()[:5 * 512])
    (tmp_path / "classnames.json").write_text(json.dumps({"0": "red", "1": "green", "2": "blue"}))

    ds = load_eval_dataset(f"wds:{tmp_path}/{{000..003}}.tar", image_size=4)
    assert ds.classnames == ["red", "green", "blue"]
    # s006's jpg in 002 runs past the end of the file: part of the damage, not a sample
    # without a label (the one tar index reader stops at it)
    assert ds.problems.counts == {"missing_image_or_cls": 1, "bad_cls": 1, "cls_out_of_range": 1,
                                  "damaged_shard": 2}
    assert len(ds) == 9 + 1 + 1 + 1  # good + corrupt jpg + s005 from 002 + s005 from 003
    model = _stub()
    fs = extract_image_features(model, ds, device="cpu", batch_size=4, progress=False)
    assert fs.skipped == 1 and len(fs.indices) == 11  # the corrupt JPEG
    res = zeroshot_eval(model, model.tokenizer(), ds, ["a photo of {}"], device="cpu", features=fs)
    assert res["top1"] == 1.0 and res["n"] == 11


def test_wds_needs_class_names(tmp_path: Path) -> None:
    _write_tar(tmp_path / "0.tar", [("a", {"jpg": _jpg(RGB["red"]), "cls": b"0"})])
    with pytest.raises(FileNotFoundError, match="no class names"):
        load_eval_dataset(f"wds:{tmp_path}/0.tar")
    ds = load_eval_dataset(f"wds:{tmp_path}/0.tar", classnames=["red"])
    assert ds.classnames == ["red"] and ds.labels.tolist() == [0]


def test_captions_grouped_by_image_and_retrieval(tmp_path: Path) -> None:
    red, green, blue = _jpg(RGB["red"]), _jpg(RGB["green"]), _jpg(RGB["blue"])
    sha_green = hashlib.sha256(b"the green file").hexdigest()
    samples = [
        ("a", {"jpg": red, "txt": b"red"}),
        ("b", {"jpg": green, "txt": b"green", "json": json.dumps({"sha256": sha_green}).encode()}),
        ("c", {"jpg": red, "txt": b"a red square"}),     # same bytes as a -> same image
        ("d", {"jpg": blue, "txt": b"green"}),           # a wrong caption: blue image described as green
        ("e", {"jpg": green, "txt": b"blue", "json": json.dumps({"sha256": sha_green}).encode()}),
    ]
    _write_tar(tmp_path / "0.tar", samples[:3])
    _write_tar(tmp_path / "1.tar", samples[3:])
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"shards": [{"path": "0.tar", "num_samples": 3}, {"path": "1.tar", "num_samples": 2}], "total_samples": 5}))
    ds = load_eval_dataset(f"captions:{tmp_path}/manifest.json")
    assert len(ds) == 3  # red, green, blue
    assert ds.captions == ["red", "green", "a red square", "green", "blue"]
    assert ds.text_to_image.tolist() == [0, 1, 0, 2, 1]
    model = _stub()
    model.texts.append("a red square")
    model.table = torch.cat([model.table, model.table[:1]])
    res = retrieval_eval(model, model.tokenizer(), ds, device="cpu")
    # sim = colour . caption colour. image->text: red owns "red" and "a red square" (both 1, no
    # foreign caption >= 1) -> hit at 1; green's best own caption "green" (1) ties the foreign
    # "green" of the blue image -> rank 1; blue owns only "green" (0) and all 4 foreign captions
    # score >= 0 -> rank 4. So R@1 = 1/3, R@5 = 1.
    assert res["i2t_r1"] == pytest.approx(1 / 3) and res["i2t_r5"] == 1.0
    # text->image: "red", "a red square", "green"(b) rank 0; "green"(d) belongs to the blue image
    # (0) but the green image scores 1 and the red one ties at 0 -> rank 2; "blue"(e) belongs to
    # the green image (0): blue scores 1, red ties -> rank 2. R@1 = 3/5, R@5 = 1.
    assert res["t2i_r1"] == pytest.approx(3 / 5) and res["t2i_r5"] == 1.0
    assert res["n_images"] == 3 and res["n_texts"] == 5


def test_imagefolder_split_and_classnames(tmp_path: Path) -> None:
    for split, n in (("train", 2), ("test", 1)):
        for folder, colour in (("dark_red", "red"), ("leaf_green", "green")):
            d = tmp_path / split / folder
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (6, 6), RGB[colour]).save(d / f"{i}.png")
    (tmp_path / "train" / "dark_red" / "notes.txt").write_text("not an image")
    tr = load_eval_dataset(f"imagefolder:{tmp_path}", split="train")
    te = load_eval_dataset(f"imagefolder:{tmp_path}", split="test")
    assert tr.classnames == ["dark red", "leaf green"] and tr.labels.tolist() == [0, 0, 1, 1]
    assert len(te) == 2
    (tmp_path / "classnames.txt").write_text("red\ngreen\n")
    te = load_eval_dataset(f"imagefolder:{tmp_path}", split="test")
    model = _stub()
    assert te.classnames == ["red", "green"]
    assert zeroshot_eval(model, model.tokenizer(), te, ["{}"])["top1"] == 1.0


def test_packaged_limit_is_a_fixed_subset() -> None:
    a = load_eval_dataset("packaged:digits", "test", limit=50)
    b = load_eval_dataset("packaged:digits", "test", limit=50)
    full = load_eval_dataset("packaged:digits", "test")
    assert len(a) == 50 and a.labels.tolist() == b.labels.tolist() and a.fingerprint == b.fingerprint
    assert a.fingerprint != full.fingerprint and len(set(a.labels.tolist())) > 5  # not the first 50 in order
    assert full.classnames[3] == "three"
    x, i = full.set_image_size(16)[0]
    assert tuple(x.shape) == (3, 16, 16) and i == 0


def test_bad_specs() -> None:
    with pytest.raises(ValueError, match="KIND:VALUE"):
        load_eval_dataset("fashion-mnist")
    with pytest.raises(ValueError, match="unknown dataset kind"):
        load_eval_dataset("csv:/x")
    with pytest.raises(ValueError, match="unknown packaged"):
        load_eval_dataset("packaged:imagenet")


def test_feature_cache_roundtrip_and_damage(tmp_path: Path) -> None:
    ds = load_eval_dataset("packaged:digits", "test", limit=8, image_size=4)
    cache = FeatureCache(tmp_path)
    calls = []

    def compute() -> FeatureSet:
        calls.append(1)
        return FeatureSet(np.ones((8, 3), np.float32), np.arange(8), 0)

    a = cache.get_or_compute("ckpt", ds, compute)
    b = cache.get_or_compute("ckpt", ds, compute)
    assert len(calls) == 1 and np.array_equal(a.features, b.features) and b.indices.tolist() == list(range(8))
    cache.get_or_compute("other-ckpt", ds, compute)
    assert len(calls) == 2
    cache.path("ckpt", ds.fingerprint, ds.transform_id).write_bytes(b"garbage")
    cache.get_or_compute("ckpt", ds, compute)
    assert len(calls) == 3
