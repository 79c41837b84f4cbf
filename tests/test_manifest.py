"""The one manifest reader (pretrain.shards.manifest): one set of rules, paths confined.

Reproduces the hole: a shared manifest whose shard `path` is `pipe:touch MARKER; cat a.tar`
was handed to webdataset's `gopen`, which ran it in a shell when training read the
manifest; `../` and absolute paths were accepted too. Each case goes through the real
readers: the trainer's source expansion and shard reader, evaluation's `captions:`/`wds:`
expansion, and one real `deepspeed` launch of the trainer.

Run: `.venv/bin/python -m pytest -q tests/test_manifest.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.data.sources import DataSource, expand_sources, expand_urls
from pretrain.data.tar_reader import ReadMode, SkipCounter, read_shard
from pretrain.shards.manifest import ManifestError, load_manifest, make_manifest
from shard_factory import make_caption_shards


def _write(path: Path, record) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record), encoding="utf-8")
    return path


def _train_reads(manifest: Path) -> None:
    """What training does with a manifest source: expand it, then read every shard."""
    for url in expand_sources([DataSource(str(manifest))])[0]:
        list(read_shard(url, SkipCounter(), ReadMode()))


def test_pipe_command_in_a_manifest_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    shards = make_caption_shards(tmp_path / "data", n_shards=1, per_shard=2, image_px=16)
    poisoned = _write(tmp_path / "data" / "manifest.json",
                      {"shards": [{"path": f"pipe:touch {marker}; cat {shards.shard_paths[0]}", "num_samples": 2}]})
    with pytest.raises(ManifestError, match="is a URL or command"):
        _train_reads(poisoned)
    from pretrain.eval.tario import expand_shards

    with pytest.raises(ManifestError, match="is a URL or command"):
        expand_shards(str(poisoned))
    assert not marker.exists()


@pytest.mark.parametrize("path, message", [
    ("../outside/00000.tar", "leaves the manifest's folder"),
    ("shards/../../outside/00000.tar", "leaves the manifest's folder"),
    ("/etc/passwd", "is absolute"),
    ("s3://other-bucket/00000.tar", "is a URL or command"),
    ("file:///etc/passwd", "is a URL or command"),
    ("simplecache::s3://b/x.tar", "is a URL or command"),
    (".", "leaves the manifest's folder"),
    ("", "non-empty string"),
])
def test_paths_outside_the_manifests_folder_are_refused(tmp_path: Path, path: str, message: str) -> None:
    manifest = _write(tmp_path / "m" / "manifest.json", {"shards": [{"path": path, "num_samples": 1}]})
    with pytest.raises(ManifestError, match=message):
        _train_reads(manifest)


@pytest.mark.parametrize("record, message", [
    ([{"path": "a.tar"}], "expected a JSON object"),
    ({"shards": []}, "lists no shards"),
    ({"shards": "shards/0.tar"}, "lists no shards"),
    ({}, "lists no shards"),
    ({"shards": [{"num_samples": 3}]}, r"shards\[0\]: shard entry has no 'path'"),
    ({"shards": [{"path": "a.tar", "num_samples": "3"}]}, "num_samples must be an integer"),
    ({"shards": [{"path": "a.tar", "num_samples": True}]}, "num_samples must be an integer"),
    ({"shards": [{"path": "a.tar", "num_samples": -1}]}, "num_samples must be an integer"),
    ({"shards": [{"path": 7}]}, "non-empty string"),
    ({"shards": [["a.tar"]]}, "must be a path or an object"),
    ({"shards": [{"path": "a.tar", "sha256": 5}]}, "sha256 must be a string"),
    ({"pattern": 5}, "'pattern' must be a string"),
    ({"shards": [{"path": "a.tar", "num_samples": 0}]}, "every shard has num_samples == 0"),
])
def test_bad_manifests_give_a_clear_error(tmp_path: Path, record, message: str) -> None:
    manifest = _write(tmp_path / "manifest.json", record)
    with pytest.raises(ManifestError, match=message):
        load_manifest(str(manifest))


def test_unreadable_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ManifestError, match="cannot read data manifest"):
        load_manifest(str(tmp_path / "manifest.json"))
    with pytest.raises(ManifestError, match="cannot read data manifest"):
        load_manifest(str(tmp_path / "missing.json"))


def test_one_set_of_rules_for_every_reader(tmp_path: Path) -> None:
    """Missing num_samples = unknown (read); 0 = skipped; string entries and patterns; the
    trainer and evaluation resolve the same files."""
    from pretrain.eval.tario import expand_shards

    root = tmp_path / "m"
    manifest = _write(root / "manifest.json", {"shards": [
        {"path": "shards/a.tar"}, {"path": "shards/b.tar", "num_samples": 0}, "shards/c.tar",
        {"path": "./shards/../shards/d.tar", "num_samples": 4}]})
    want = [str(root / "shards" / n) for n in ("a.tar", "c.tar", "d.tar")]
    assert expand_urls(str(manifest)) == want
    assert expand_shards(str(manifest)) == want
    pattern = _write(root / "p.json", {"pattern": "shards/{0..2}.tar"})
    assert expand_urls(str(pattern)) == [str(root / "shards" / f"{i}.tar") for i in range(3)]


def test_remote_manifest_stays_on_its_own_scheme_and_folder() -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/ds/manifest.json", json.dumps({"shards": [{"path": "shards/0.tar", "num_samples": 1}]}).encode())
    assert expand_urls("memory://bucket/ds/manifest.json") == ["memory://bucket/ds/shards/0.tar"]
    fs.pipe("/bucket/ds/bad.json", json.dumps({"shards": [{"path": "../other/0.tar"}]}).encode())
    with pytest.raises(ManifestError, match="leaves the manifest's folder memory://bucket/ds"):
        expand_urls("memory://bucket/ds/bad.json")


def test_pipe_typed_by_the_user_in_data_sources_still_works(tmp_path: Path) -> None:
    shards = make_caption_shards(tmp_path, n_shards=1, per_shard=3, image_px=16)
    url = f"pipe:cat {shards.shard_paths[0]}"
    assert expand_sources([DataSource(url)]) == [[url]]
    samples = list(read_shard(url, SkipCounter(), ReadMode()))
    assert len(samples) == 3


def test_a_writer_never_emits_what_readers_refuse() -> None:
    with pytest.raises(ManifestError, match="leaves the manifest's folder"):
        make_manifest([{"path": "../x.tar", "num_samples": 1}], 10, ["jpg", "txt"])
    record = make_manifest([{"path": "shards/00000.tar", "num_samples": 2}], 10, ["jpg", "txt"], config={})
    assert record["pattern"] == "shards/{00000..00000}.tar" and record["total_samples"] == 2


@pytest.mark.slow
def test_trainer_refuses_a_poisoned_manifest_at_start(tmp_path: Path) -> None:
    """A real launch: the trainer stops with the manifest error and the command never runs."""
    from train_driver import CaptionData, launch, tiny_overrides

    marker = tmp_path / "pwned"
    shards = make_caption_shards(tmp_path / "data", n_shards=1, per_shard=8, image_px=32)
    poisoned = _write(tmp_path / "data" / "manifest.json",
                      {"shards": [{"path": f"pipe:touch {marker}; cat {shards.shard_paths[0]}", "num_samples": 8}]})
    data = CaptionData(poisoned, shards.pattern, [])
    result = launch(tmp_path / "run", tiny_overrides(data, steps=4, extra=["--logging.mlflow=false"]), nprocs=1,
                    timeout=240)
    assert result.rc != 0, result.output[-3000:]
    assert "is a URL or command" in result.output, result.output[-3000:]
    assert not marker.exists()
