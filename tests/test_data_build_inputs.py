"""URL-list reading (every input format), config handling and the CLI's clear errors.

None of these start a crawl. Run: .venv/bin/python -m pytest -q tests/test_data_build_inputs.py
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from data_pipeline import cli
from data_pipeline.inputs import InputError, list_input_files, read_url_table

ROWS = pd.DataFrame({
    "link": ["http://a.example/1.jpg", "http://a.example/2.jpg", "http://b.example/3.png"],
    "text": ["a red dress, with a \"belt\"", "two words", "tab\tinside? no: comma, inside"],
    "label": [3, 1, 7],
    "width": [10, 20, 30],  # clashes with a column img2dataset reserves
})


def write_all_formats(d: Path) -> dict[str, Path]:
    files = {"csv": d / "u.csv", "tsv": d / "u.tsv", "parquet": d / "u.parquet", "jsonl": d / "u.jsonl", "txt": d / "u.txt"}
    ROWS.to_csv(files["csv"], index=False)
    ROWS.assign(text=ROWS["text"].str.replace("\t", " ")).to_csv(files["tsv"], index=False, sep="\t")
    ROWS.to_parquet(files["parquet"])
    ROWS.to_json(files["jsonl"], orient="records", lines=True)
    files["txt"].write_text("\n".join(ROWS["link"]) + "\n\n")
    return files


def test_every_format_reads_to_the_same_table(tmp_path: Path) -> None:
    files = write_all_formats(tmp_path)
    for fmt in ("csv", "tsv", "parquet", "jsonl"):
        got, detected = list_input_files(str(files[fmt]))
        assert detected == fmt
        t = read_url_table(got[0], fmt, url_col="link", caption_col="text").to_pandas()
        assert t.columns.tolist() == ["url", "caption", "label", "src_width"], fmt
        assert t["url"].tolist() == ROWS["link"].tolist(), fmt
        expected = ROWS["text"].str.replace("\t", " ") if fmt == "tsv" else ROWS["text"]
        assert t["caption"].tolist() == expected.tolist(), fmt
        assert t["label"].tolist() == [3, 1, 7] and t["src_width"].tolist() == [10, 20, 30], fmt
    t = read_url_table(str(files["txt"]), "txt").to_pandas()
    assert t.columns.tolist() == ["url"] and t["url"].tolist() == ROWS["link"].tolist()
    only = read_url_table(str(files["parquet"]), "parquet", "link", "text", extra_columns=["label"]).to_pandas()
    assert only.columns.tolist() == ["url", "caption", "label"]


def test_directory_of_files_and_headerless_tsv(tmp_path: Path) -> None:
    for i in range(3):
        ROWS.iloc[[i]].to_parquet(tmp_path / f"part-{i}.parquet")
    files, fmt = list_input_files(str(tmp_path))
    assert fmt == "parquet" and [Path(f).name for f in files] == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    cc3m = tmp_path / "cc3m.tsv"  # CC3M's layout: caption <TAB> url, no header
    cc3m.write_text("a dog on a beach\thttp://x.example/1.jpg\nred car\thttp://x.example/2.jpg\n")
    t = read_url_table(str(cc3m), "tsv", url_col="f1", caption_col="f0", header=False).to_pandas()
    assert t["url"].tolist() == ["http://x.example/1.jpg", "http://x.example/2.jpg"]
    assert t["caption"].tolist() == ["a dog on a beach", "red car"]


def test_undecodable_caption_bytes_become_replacement_characters(tmp_path: Path) -> None:
    (tmp_path / "u.csv").write_bytes(b"url,caption\nhttp://a/1.jpg,fine caption\nhttp://a/2.jpg,caf\xe9 cr\xe8me\n")
    t = read_url_table(str(tmp_path / "u.csv"), "csv").to_pandas()
    assert t["caption"].tolist() == ["fine caption", "caf\ufffd cr\ufffdme"]
    pd.DataFrame({"url": ["http://a/1.jpg"], "caption": [b"\xff\xfe bytes"]}).to_parquet(tmp_path / "b.parquet")
    assert read_url_table(str(tmp_path / "b.parquet"), "parquet").to_pandas()["caption"][0] == "\ufffd\ufffd bytes"


def test_clear_input_errors(tmp_path: Path) -> None:
    files = write_all_formats(tmp_path)
    with pytest.raises(InputError, match=r"column\(s\) 'url', 'caption' not found; it has 'link', 'text'"):
        read_url_table(str(files["csv"]), "csv")
    with pytest.raises(InputError, match=r"'caption' not found"):
        read_url_table(str(files["parquet"]), "parquet", url_col="link")
    with pytest.raises(InputError, match="not found"):
        list_input_files(str(tmp_path / "nope.parquet"))
    (tmp_path / "u.dat").write_text("x")
    with pytest.raises(InputError, match="cannot tell the format"):
        list_input_files(str(tmp_path / "u.dat"))
    with pytest.raises(InputError, match="holds int64, not text URLs"):
        read_url_table(str(files["parquet"]), "parquet", url_col="label", caption_col="text")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="cannot read as parquet"):
        read_url_table(str(tmp_path / "broken.parquet"), "parquet")


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_cli_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = write_all_formats(tmp_path)
    out = str(tmp_path / "out")
    code, text = run_cli(["build", "--urls", str(tmp_path / "missing.csv"), "--output", out], capsys)
    assert code == 2 and "URL list not found" in text
    code, text = run_cli(["crawl", "--urls", str(files["csv"]), "--output", out], capsys)
    assert code == 2 and "'url', 'caption' not found" in text and "crawl.url_col" in text
    code, text = run_cli(["crawl", "--urls", str(files["csv"]), "--output", out, "--crawl.no_such_key=3"], capsys)
    assert code == 2 and "config crawl.no_such_key: unknown key" in text
    code, text = run_cli(["crawl", "--urls", str(files["csv"]), "--output", out, "--crawl.timeout=soon"], capsys)
    assert code == 2 and "crawl.timeout: expected a number" in text
    code, text = run_cli(["filter", "--output", str(tmp_path / "empty_out")], capsys)
    assert code == 2 and "run `crawl` or `build` first" in text
    code, text = run_cli(["build", "--output", str(tmp_path / "fresh")], capsys)
    assert code == 2 and "no URL list given" in text


def test_output_holding_another_dataset_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from data_pipeline.config import load_config
    from data_pipeline.layout import Layout
    from data_pipeline.pipeline import bind
    from data_pipeline.prepare import prepare_inputs

    files = write_all_formats(tmp_path)
    out = tmp_path / "out"
    base = [("urls", str(files["parquet"])), ("output", str(out)), ("crawl.url_col", "link"),
            ("crawl.caption_col", "text"), ("crawl.allow_private_addresses", True)]
    # nothing built yet: a first attempt with other settings may simply be replaced
    bind(load_config(None, base + [("crawl.image_size", 64)]), with_input=True)
    cfg = load_config(None, base)
    bind(cfg, with_input=True)
    saved = json.loads((out / "build_config.json").read_text())
    assert saved["identity"]["crawl"]["url_col"] == "link" and len(saved["identity"]["input_sha256"]) == 64
    assert saved["identity"]["crawl"]["image_size"] == 256
    prepare_inputs(cfg, Layout(str(out)))  # the first stage has written data from now on
    # speed settings do not change the dataset: the same output is resumed
    bind(load_config(None, base + [("processes", 7), ("crawl.thread_count", 3)]), with_input=True)
    code, text = run_cli(["crawl", "--urls", str(files["parquet"]), "--output", str(out), "--crawl.image_size=512"], capsys)
    assert code == 2 and "already holds a different dataset" in text and "crawl.image_size: 256 -> 512" in text
    files["parquet"].write_bytes(files["parquet"].read_bytes())  # same bytes: still the same dataset
    bind(cfg, with_input=True)
    ROWS.iloc[:2].to_parquet(files["parquet"])  # the URL list changed
    code, text = run_cli(["crawl", "--urls", str(files["parquet"]), "--output", str(out)], capsys)
    assert code == 2 and "input_sha256" in text
    stranger = tmp_path / "not_a_build"
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("precious")
    code, text = run_cli(["crawl", "--urls", str(files["parquet"]), "--output", str(stranger)], capsys)
    assert code == 2 and "holds no build_config.json" in text and (stranger / "thesis.tex").exists()


def test_config_file_overrides_and_help(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from data_pipeline.config import load_config

    (tmp_path / "b.yaml").write_text("crawl:\n  timeout: 4\n  allowed_networks: [127.0.0.1/32]\nfilter:\n  image:\n    min_side: 64\n")
    cfg = load_config(str(tmp_path / "b.yaml"), [("crawl.timeout", 5), ("shard.samples_per_shard", "100")])
    assert cfg.crawl.timeout == 5.0 and cfg.crawl.allowed_networks == ["127.0.0.1/32"]
    assert cfg.filter.image.min_side == 64
    assert cfg.filter.image.size_source == "original"  # this build's default survives a partial section
    assert cfg.shard.samples_per_shard == 100
    for command in ("build", "crawl", "filter", "shard", "stats"):
        with pytest.raises(SystemExit) as e:
            cli.main([command, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "--crawl.timeout=10.0" in text and "--crawl.caption_col=caption" in text and "--filter.image.min_side" in text and "--shard.samples_per_shard" in text


def test_missing_distributor_package_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    if importlib.util.find_spec("ray") is not None:
        pytest.skip("ray is installed here")
    files = write_all_formats(tmp_path)
    code, text = run_cli(["crawl", "--urls", str(files["parquet"]), "--output", str(tmp_path / "out"),
                          "--distributor", "ray", "--crawl.url_col=link", "--crawl.caption_col=text",
                          "--allow-private-addresses"], capsys)
    assert code == 2 and "crawl.distributor=ray needs the ray package" in text


def test_build_where_every_url_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing to crawl: the build still completes and accounts for every row."""
    urls = ["http://10.0.0.1/a.jpg", "file:///etc/passwd", "", "http://[::1]/b.jpg"]
    pd.DataFrame({"url": urls, "caption": ["a caption here"] * 4}).to_parquet(tmp_path / "u.parquet")
    code, text = run_cli(["build", "--urls", str(tmp_path / "u.parquet"), "--output", str(tmp_path / "out")], capsys)
    assert code == 0, text
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["counts"] == {"safety/private_address": 2, "safety/bad_scheme": 1, "input/missing_url": 1}
    assert (stats["rows_in"], stats["kept"], stats["unaccounted"]) == (4, 0, 0)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["shards"], manifest["total_samples"], manifest["pattern"]) == ([], 0, None)
    assert "| kept     | samples" in text
