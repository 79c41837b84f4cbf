"""Shard-stage pieces: deterministic tars that webdataset reads, RGB JPEG output, tar
member random access, atomic writes, manifest pattern and stats histograms.

Run: .venv/bin/python -m pytest -q tests/test_shard_writer.py
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import braceexpand
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipeline import fsutil
from data_pipeline.manifest import build_manifest
from pretrain.shards.manifest import brace_pattern
from data_pipeline.shard import as_rgb_jpeg, sample_json
from data_pipeline.stats import histogram
from pretrain.shards.tario import TarIndex, tar_bytes


def _png(mode: str, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(0)
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2}[mode]
    arr = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8).squeeze()
    b = io.BytesIO()
    Image.fromarray(arr, mode).save(b, "PNG")
    return b.getvalue()


def test_tars_are_deterministic_and_load_with_webdataset(tmp_path: Path) -> None:
    samples = [(f"{i:09d}", {"txt": f"caption {i}".encode(), "jpg": as_rgb_jpeg(_png("RGB"), 90)[0],
                              "json": json.dumps({"i": i}).encode()}) for i in range(5)]
    a, b = tar_bytes(samples), tar_bytes(samples)
    assert a == b
    (tmp_path / "00000.tar").write_bytes(a)
    with tarfile.open(tmp_path / "00000.tar") as tf:
        members = tf.getmembers()
        assert [m.name for m in members[:3]] == ["000000000.jpg", "000000000.json", "000000000.txt"]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o444)}
    ds = wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json")
    got = list(ds)
    assert [k for k, *_ in got] == [s[0] for s in samples]
    assert got[3][2] == "caption 3" and got[3][3] == {"i": 3} and got[3][1].mode == "RGB"
    with pytest.raises(ValueError, match="must not contain"):
        tar_bytes([("a.b", {"txt": b"x"})])


def test_tar_index_reads_single_members(tmp_path: Path) -> None:
    samples = [(f"k{i}", {"jpg": bytes([i]) * (100 + 517 * i), "txt": f"t{i}".encode()}) for i in range(4)]
    path = tmp_path / "x.tar"
    path.write_bytes(tar_bytes(samples))
    idx = TarIndex(str(path))
    for key, parts in reversed(samples):
        assert idx.read(f"{key}.jpg") == parts["jpg"] and idx.read(f"{key}.txt") == parts["txt"]
    with pytest.raises(KeyError):
        idx.read("nope.jpg")


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA"])
def test_every_image_becomes_an_rgb_jpeg(mode: str) -> None:
    data, w, h = as_rgb_jpeg(_png(mode), 90)
    with Image.open(io.BytesIO(data)) as im:
        assert (im.format, im.mode, im.size, (w, h)) == ("JPEG", "RGB", (40, 30), (40, 30))


def test_rgb_jpeg_bytes_pass_through_unchanged() -> None:
    rgb = as_rgb_jpeg(_png("RGB"), 80)[0]
    assert as_rgb_jpeg(rgb, 95)[0] == rgb  # no second lossy encode
    grey = io.BytesIO()
    Image.fromarray(np.full((8, 8), 128, np.uint8), "L").save(grey, "JPEG")
    out = as_rgb_jpeg(grey.getvalue(), 95)[0]
    assert out != grey.getvalue() and Image.open(io.BytesIO(out)).mode == "RGB"


def test_sample_json_is_plain_and_complete() -> None:
    row = {"source_tar": "00001.tar", "key": "000017", "url": "http://x/a.jpg", "caption": "a red dress",
           "width": 96, "height": 96, "sha256": "ab" * 32, "phash": np.uint64(123), "clip_score": np.float32(0.25),
           "nan_score": float("nan")}
    meta = {"original_width": np.int32(300), "original_height": 200, "input_row": np.int64(5), "label": 3,
            "source": "case-1", "status": "success", "error_message": None, "width": 96}
    doc = sample_json(row, meta, "000000004", 96, 64)
    text = json.dumps(doc, allow_nan=False)  # JSON-safe
    assert json.loads(text) == {
        "key": "000000004", "url": "http://x/a.jpg", "caption": "a red dress", "width": 96, "height": 64,
        "original_width": 300, "original_height": 200, "sha256": "ab" * 32, "phash": 123, "clip_score": 0.25,
        "nan_score": None, "source": {"crawl_tar": "00001.tar", "crawl_key": "000017", "input_row": 5},
        "extra": {"label": 3, "source": "case-1"},
    }


def test_manifest_pattern_expands_to_the_shards() -> None:
    shards = [{"path": f"shards/{i:05d}.tar", "num_samples": 10 if i < 3 else 4, "sha256": "0"} for i in range(4)]
    m = build_manifest(shards, {"shard": {"samples_per_shard": 10}}, 10)
    assert m["pattern"] == "shards/{00000..00003}.tar" and m["total_samples"] == 34 and m["num_shards"] == 4
    assert list(braceexpand.braceexpand(m["pattern"])) == [s["path"] for s in shards]
    assert brace_pattern(["shards/00000.tar"]) == "shards/{00000..00000}.tar"
    assert brace_pattern([]) is None
    assert set(m["versions"]) >= {"python", "img2dataset", "webdataset", "data_pipeline"}
    assert "time" not in json.dumps(m)  # nothing wall-clock: rebuilds are byte-identical


def test_histogram_bins() -> None:
    h = histogram([0, 9, 10, 19, 20, 5000], [0, 10, 20, 40])
    assert h["counts"] == [2, 2, 1, 1] and h["labels"] == ["0-9", "10-19", "20-39", ">=40"]


def test_atomic_open_leaves_nothing_behind_on_error(tmp_path: Path) -> None:
    target = tmp_path / "d" / "file.tar"
    with pytest.raises(RuntimeError):
        with fsutil.atomic_open(str(target)) as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert not target.exists() and list((tmp_path / "d").iterdir()) == []
    fsutil.write_json(str(target), {"b": 1, "a": [1, 2]})
    assert target.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    (tmp_path / "d" / ".file.tar.tmp-123-abcd").write_bytes(b"left by kill -9")
    assert fsutil.remove_stale_tmp(str(tmp_path / "d")) == 1
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["file.tar"]
