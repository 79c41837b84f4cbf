"""The filter stage end to end on img2dataset-like tars: every per-sample rule inside the
stage, global exact/near dedup across tars, independence of process count and tar order,
resume, the per-tar worker CLI, and full accounting (kept + counted == input)."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from data_pipeline.filter import FilterConfig, filter_stage, global_pass, shard_pass
from data_pipeline.filter.worker import main as worker_main
from test_filter_support import (
    distinct_indices, encode, good, phash_int, png_bomb, real_caption, real_image, sample, write_tar,
)

ROOT = Path(__file__).resolve().parents[1]


def build_dataset(tmp: Path) -> tuple[list[str], dict[tuple[str, str], str]]:
    """Two tars and the expected decision of every sample, keyed by (tar file name, key)."""
    d = distinct_indices(16)
    img = {j: encode(real_image(d[j])) for j in range(16)}
    cap = {j: real_caption(d[j]) for j in range(16)}
    near_q = encode(real_image(d[0]), quality=60)  # JPEG re-encode at another quality
    near_rs = encode(real_image(d[3]), size=240, quality=80)  # slight resize
    for a, b in ((img[0], near_q), (img[3], near_rs)):
        assert bin(phash_int(a) ^ phash_int(b)).count("1") <= 4 and a != b  # precondition
    rows0 = [(f"00000000{j}", sample(f"00000000{j}", img[j], cap[j]), "kept") for j in range(6)] + [
        ("000000010", sample("000000010", img[6][: len(img[6]) // 2], "a truncated jpeg file"), "filter/corrupt_image"),
        ("000000011", sample("000000011", b"", "a zero byte image file"), "filter/empty_image"),
        ("000000012", sample("000000012", b"<html>not an image</html>", "an html page instead"), "filter/not_an_image"),
        ("000000013", sample("000000013", png_bomb(60_000, 60_000), "a decompression bomb png"), "filter/decompression_bomb"),
        ("000000014", sample("000000014", encode(real_image(d[7]), 28), "a tiny 28 pixel image"), "filter/min_side"),
        ("000000015", sample("000000015", encode(real_image(d[7]), (800, 200)), "a very wide panorama"), "filter/aspect_ratio"),
        ("000000016", sample("000000016", img[6], b"a\x00 shirt\t\x1b with\r\ncontrol chars"), "kept"),
        ("000000017", sample("000000017", img[7], b"caf\xe9 au lait in latin-1"), "filter/caption_encoding"),
        ("000000018", sample("000000018", img[8], "IMG_1234.JPG"), "filter/caption_filename"),
        ("000000019", sample("000000019", img[9], " ".join(f"long{i}" for i in range(300))), "filter/caption_too_long"),
        ("000000020", sample("000000020", near_q, "the same coat saved again"), "filter/near_duplicate"),
        ("000000021", sample("000000021", None, "json and text only"), "filter/missing_image"),
    ]
    url2 = "http://example.com/000000002.jpg"  # the url of sample 000000002 above
    rows1 = [
        ("000010000", sample("000010000", img[1], "the same bytes under another url", url="http://other.org/x.jpg"), "filter/duplicate_image"),
        ("000010001", sample("000010001", img[10], cap[2], url=url2), "filter/duplicate_url_caption"),
        ("000010002", sample("000010002", near_rs, "a resized copy of a picture"), "filter/near_duplicate"),
        ("000010003", sample("000010003", img[11], cap[11]), "kept"),
        ("000010004", sample("000010004", img[12], cap[12]), "kept"),
        ("000010005", sample("000010005", img[13], cap[13]), "kept"),
        # No sha256 in the json: the filter hashes the bytes itself.
        ("000010006", sample("000010006", img[14], cap[14], with_sha=False), "kept"),
        ("000010007", sample("000010007", img[14], "copy without a hash", with_sha=False), "filter/duplicate_image"),
        ("000010008", sample("000010008", encode(real_image(d[15]), fmt="PNG"), cap[15], ext="png"), "kept"),
    ]
    t0 = write_tar(tmp / "00000.tar", [s for _, s, _ in rows0])
    t1 = write_tar(tmp / "00001.tar", [s for _, s, _ in rows1])
    expected = {("00000.tar", k): e for k, _, e in rows0} | {("00001.tar", k): e for k, _, e in rows1}
    return [t0, t1], expected


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("tars"))


def check_result(res, expected: dict) -> None:
    want_counts = Counter(e for e in expected.values() if e != "kept")
    assert res.counts == dict(want_counts)
    kept = sorted((Path(t).name, k) for t, k in zip(res.kept["source_tar"], res.kept["key"]))
    assert kept == sorted(k for k, e in expected.items() if e == "kept")
    assert res.total_in == len(expected)
    assert sum(res.counts.values()) + len(res.kept) == res.total_in  # nothing lost uncounted
    assert list(zip(res.kept["source_tar"], res.kept["key"])) == sorted(zip(res.kept["source_tar"], res.kept["key"]))


@pytest.mark.timeout(120)
def test_every_rule_and_global_dedup(dataset, tmp_path):
    tars, expected = dataset
    res = filter_stage(tars, str(tmp_path / "work"), FilterConfig(), processes=1)
    check_result(res, expected)
    row = res.kept.set_index("key").loc["000000016"]
    assert row["caption"] == "a shirt with control chars"
    assert row["width"] == 256 and row["height"] == 256 and len(row["phash"]) == 16 and len(row["sha256"]) == 64
    # decisions.parquet: every input sample once, with its reason.
    dec = pd.read_parquet(tmp_path / "work" / "decisions.parquet")
    got = {(Path(t).name, k): d for t, k, d in zip(dec["source_tar"], dec["key"], dec["decision"])}
    assert got == expected


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_independent_of_process_count_and_tar_order(dataset, tmp_path):
    tars, expected = dataset
    a = filter_stage(tars, str(tmp_path / "a"), FilterConfig(), processes=1)
    b = filter_stage(list(reversed(tars)), str(tmp_path / "b"), FilterConfig(), processes=2)
    check_result(b, expected)
    pd.testing.assert_frame_equal(a.kept, b.kept)
    assert a.counts == b.counts


@pytest.mark.timeout(120)
def test_resume_reuses_finished_shards(dataset, tmp_path, monkeypatch):
    tars, expected = dataset
    work = tmp_path / "work"
    first = filter_stage(tars, str(work), FilterConfig(), processes=1)
    per = {p.name: p.stat().st_mtime_ns for p in (work / "per_shard").glob("*.parquet")}
    assert sorted(per) == ["00000.parquet", "00001.parquet"]

    calls: list[str] = []
    real = shard_pass.evaluate_sample
    monkeypatch.setattr(shard_pass, "evaluate_sample", lambda tar, key, *a: calls.append(key) or real(tar, key, *a))
    again = filter_stage(tars, str(work), FilterConfig(), processes=1)
    assert calls == []  # nothing recomputed
    pd.testing.assert_frame_equal(first.kept, again.kept)

    # A crash mid-way: one per-shard file missing, a temporary file left behind.
    (work / "per_shard" / "00001.parquet").unlink()
    (work / "per_shard" / ".tmp-deadbeef-00001.parquet").write_bytes(b"half a file")
    resumed = filter_stage(tars, str(work), FilterConfig(), processes=1)
    assert sorted(calls) == sorted(k for (t, k) in expected if t == "00001.tar")
    assert (work / "per_shard" / "00000.parquet").stat().st_mtime_ns == per["00000.parquet"]
    pd.testing.assert_frame_equal(first.kept, resumed.kept)
    assert first.counts == resumed.counts
    check_result(global_pass(str(work), FilterConfig()), expected)  # all files, .tmp ignored

    # Changed pass-1 rules invalidate the records; pass-2 settings do not.
    calls.clear()
    filter_stage(tars, str(work), FilterConfig.from_dict({"dedup": {"phash_distance": 0}}), processes=1)
    assert calls == []
    strict = filter_stage(tars, str(work), FilterConfig.from_dict({"image": {"min_side": 300}}), processes=1)
    assert len(calls) == len(expected)
    assert len(strict.kept) == 0 and sum(strict.counts.values()) == len(expected)


@pytest.mark.timeout(120)
def test_worker_cli_per_tar_then_global(dataset, tmp_path, capsys):
    tars, expected = dataset
    cfg_file = tmp_path / "filter.yaml"
    cfg_file.write_text("filter:\n  dedup:\n    phash_distance: 4\n")
    work = str(tmp_path / "work")
    for t in tars:  # as two array tasks would
        assert worker_main(["--tar", t, "--work-dir", work, "--config", str(cfg_file)]) == 0
    assert worker_main(["--global", "--work-dir", work, "--config", str(cfg_file)]) == 0
    assert '"total_in": %d' % len(expected) in capsys.readouterr().out
    dec = pd.read_parquet(Path(work) / "decisions.parquet")
    assert {(Path(t).name, k): d for t, k, d in zip(dec["source_tar"], dec["key"], dec["decision"])} == expected


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_worker_module_runs_as_a_separate_process(dataset, tmp_path):
    tars, _ = dataset
    out = subprocess.run([sys.executable, "-m", "data_pipeline.filter.worker", "--tar", tars[1], "--work-dir",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=110,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "per_shard" / "00001.parquet").is_file()


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        filter_stage([str(tmp_path / "missing.tar")], str(tmp_path / "w"), FilterConfig())
    t = write_tar(tmp_path / "00000.tar", [good(f"{i:09d}", i) for i in range(3)])
    data = Path(t).read_bytes()
    Path(t).write_bytes(data[: len(data) // 2])  # cut inside a member
    with pytest.raises(ValueError, match="00000.tar"):
        filter_stage([t], str(tmp_path / "w"), FilterConfig())
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    same = [write_tar(tmp_path / d / "00000.tar", [good("000000000", 0)]) for d in ("a", "b")]
    with pytest.raises(ValueError, match="share the name"):
        filter_stage(same, str(tmp_path / "w2"), FilterConfig())


def repeated_key_tar(tmp: Path) -> tuple[str, list[bytes]]:
    """One tar where key "a" comes three times (other pictures each time) around a real
    key "a#1": what a hostile or broken crawl can hand the filter."""
    d = distinct_indices(16)
    img = [encode(real_image(d[j])) for j in range(5)]
    samples = [sample("a", img[0], real_caption(d[0])), sample("b", img[1], real_caption(d[1])),
               sample("a", img[2], real_caption(d[2])), sample("a#1", img[3], real_caption(d[3])),
               sample("a", img[4], real_caption(d[4]))]
    return write_tar(tmp / "00000.tar", samples), img


@pytest.mark.timeout(180)
def test_a_repeated_key_is_rejected_counted_and_never_shadows_the_kept_copy(tmp_path):
    import hashlib

    from data_pipeline.filter.fsio import iter_tar_samples
    from pretrain.shards.tario import TarIndex

    tar, img = repeated_key_tar(tmp_path)
    res = filter_stage([tar], str(tmp_path / "work"), FilterConfig(), processes=1)
    dec = pd.read_parquet(tmp_path / "work" / "decisions.parquet")
    assert sorted(zip(dec["key"], dec["decision"])) == [
        ("a", "kept"), ("a#1", "kept"), ("a#2", "filter/duplicate_key"), ("a#3", "filter/duplicate_key"),
        ("b", "kept")]
    assert res.counts == {"filter/duplicate_key": 2} and res.total_in == 5
    kept = res.kept.set_index("key")
    assert kept.loc["a", "sha256"] == hashlib.sha256(img[0]).hexdigest()
    # The shard stage reads the kept sample's bytes by name: the first copy, the judged one.
    assert TarIndex(tar).read("a.jpg") == img[0] and TarIndex(tar).read("a#1.jpg") == img[3]
    # A member repeated inside one sample: the filter, too, judges the first copy.
    twice = tmp_path / "twice.tar"
    write_tar(twice, [{"key": "x", "parts": {"jpg": img[0]}}, {"key": "x", "parts": {"jpg": img[1]}}])
    assert [(k, p["jpg"]) for k, p in iter_tar_samples(str(twice))] == [("x", img[0])]
    assert TarIndex(str(twice)).read("x.jpg") == img[0]
