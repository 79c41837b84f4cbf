"""Progress where there is no terminal (a log file, a pipe): paced lines with rate and ETA,
no carriage-return fragments, no library chatter; and the data build's reject-reason chart.

- `pretrain.progress` alone: lines every ~10% (and after `every_s` without one), each with
  count, rate and ETA, the last one saying done; a bar only on a terminal.
- a real data build (`python -m data_pipeline build`) over a local HTTP server with stdout
  and stderr pipes: each stage's lines are bounded and carry a rate and an ETA, there is no
  '\\r' anywhere, img2dataset's own output is in crawl/img2dataset.log instead, and
  stats_rejects.png beside stats.md is a valid PNG of the expected size, linked from it.

Run: .venv/bin/python -m pytest -q tests/test_progress_logs.py   (~1 min: one crawl)
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import data_server_cases as cases
from data_pipeline.serve import ImageServer
from data_pipeline.stats_chart import CHART_NAME, WIDTH_PX, height_px
from pretrain.progress import LineProgress, Pacer, progress

ROOT = Path(__file__).resolve().parents[1]
RATE = re.compile(r"[\d.e+]+ \w+/s|[\d.e+]+ s/\w+")


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("[progress] ")]


def test_lines_every_tenth_with_rate_and_eta_and_a_final_done() -> None:
    out = io.StringIO()
    with LineProgress(total=1000, desc="unit", unit="img", file=out, every_s=3600) as bar:
        for _ in range(1000):
            bar.update(1)
    lines = _lines(out.getvalue())
    assert "\r" not in out.getvalue()
    assert len(lines) == 10, lines  # 10%, 20% ... 90%, then the final line
    assert lines[0].startswith("[progress] unit: 100/1000 img (10%), ")
    assert all(RATE.search(line) and "elapsed " in line for line in lines), lines
    assert all("ETA " in line for line in lines[:-1]) and lines[-1].endswith(", done"), lines


def test_eta_follows_the_recent_rate_not_a_slow_start() -> None:
    pacer = Pacer(total=100, every_s=3600)
    time.sleep(0.4)  # a slow start: workers spawning
    assert pacer.due(10) and not pacer.due(15)
    assert pacer.due(20)  # 10 more almost at once
    # the mean rate so far would say ~1.6 s for the 80 left; the rate since the last line says ~0
    assert pacer.eta(20) < 0.3 and pacer.elapsed() * 80 / 20 > 1.5


def test_time_paced_lines_without_a_total_and_a_bar_only_on_a_terminal(monkeypatch) -> None:
    out = io.StringIO()
    bar = LineProgress(desc="stream", unit="url", file=out, every_s=0.05)
    for _ in range(4):
        time.sleep(0.06)
        bar.update(7)
    bar.close()
    lines = _lines(out.getvalue())
    assert len(lines) == 5 and lines[-1].startswith("[progress] stream: 28 url, "), lines
    assert "ETA" not in out.getvalue()  # no total: no ETA to give
    # a stalled stage still says where it is (update(0): the crawl's poller does that each second)
    out = io.StringIO()
    bar = LineProgress(total=10, desc="stalled", unit="url", file=out, every_s=0.05)
    bar.update(0)
    time.sleep(0.06)
    bar.update(0)
    lines = _lines(out.getvalue())
    assert len(lines) == 1 and lines[0].startswith("[progress] stalled: 0/10 url (0%), "), lines

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("CLIP_PROGRESS", raising=False)
    assert type(progress(total=3, file=Tty())).__name__ == "tqdm"
    assert isinstance(progress(total=3, file=io.StringIO()), LineProgress)
    nested = progress(total=3, file=io.StringIO(), nested=True)  # an inner bar in a log: silent
    nested.update(3)
    nested.close()
    monkeypatch.setenv("CLIP_PROGRESS", "lines")
    assert isinstance(progress(total=3, file=Tty()), LineProgress)


@pytest.mark.slow
def test_data_build_log_without_a_terminal(tmp_path: Path) -> None:
    site = cases.make_site(tmp_path / "site")
    out = tmp_path / "out"
    with ImageServer(site.root, behaviours=site.behaviours) as srv:
        urls = tmp_path / "urls.parquet"
        site.url_table(srv.base_url).to_parquet(urls)
        cmd = [sys.executable, "-m", "data_pipeline", "build", "--urls", str(urls), "--output", str(out),
               "--processes=2", "--crawl.thread_count=8", "--crawl.number_sample_per_shard=8",
               f"--crawl.timeout={cases.TIMEOUT_S}", "--crawl.allowed_networks=[127.0.0.1/32]",
               "--shard.samples_per_shard=5"] + [f"--{k}={v}" for k, v in cases.BUILD_OVERRIDES.items()]
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.pop("CLIP_PROGRESS", None)
        env.pop("CLIP_VERBOSE", None)
        t0 = time.monotonic()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        seconds = time.monotonic() - t0
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-5000:]
    assert "\r" not in text and "\x1b[" not in text, repr(text[-3000:])
    lines = _lines(r.stderr)
    by_stage: dict[str, list[str]] = {}
    for line in lines:
        by_stage.setdefault(line[len("[progress] "):].split(":")[0], []).append(line)
    assert {"prepare", "crawl", "filter pass 1", "shard"} <= set(by_stage), lines
    for stage, got in by_stage.items():
        # every ~10% or ~30 s, plus the final line
        assert 1 <= len(got) <= 11 + int(seconds / 30), (stage, got)
        assert all(RATE.search(line) and "elapsed " in line for line in got), got
        if stage != "prepare":  # the URL list's length is not known before it is read
            assert all("ETA " in line or line.endswith(", done") for line in got), got
            assert got[-1].endswith(", done") or stage == "crawl", got
    # img2dataset's prints, its counter and its workers' lines went to the crawl's log file
    assert "Sharding file number" not in text and "it/s]" not in text and "it/s\n" not in text
    log = (out / "crawl" / "img2dataset.log").read_text()
    assert "Sharding file number" in log and "it/s" in log  # img2dataset's reader and its counter
    # the reject-reason chart beside stats.md, linked from it, a valid PNG of the expected size
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rejected"] > 0
    png = out / CHART_NAME
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (WIDTH_PX, height_px(len(stats["counts"])))
        im.verify()
    assert f"]({CHART_NAME})" in (out / "stats.md").read_text()


CHILD = ("import sys; print('img2dataset-like line'); sys.stdout.flush(); "
         "sys.stderr.write('1it [00:01, 1.0it/s]\\r2it [00:02, 1.0it/s]\\n')")


def test_crawl_output_moves_child_output_to_the_log(tmp_path: Path, capfd, monkeypatch) -> None:
    from data_pipeline.crawl_output import LOG_NAME, crawl_output

    monkeypatch.delenv("CLIP_VERBOSE", raising=False)
    monkeypatch.setenv("CLIP_PROGRESS", "lines")
    crawl_dir = tmp_path / "crawl"
    with crawl_output(str(crawl_dir), total=10, count=lambda: 10, poll_s=0.05):
        # a spawned worker inherits fds 1 and 2 (img2dataset's main-process prints: the data build test)
        subprocess.run([sys.executable, "-c", CHILD], check=True)
    out, err = capfd.readouterr()
    log = (crawl_dir / LOG_NAME).read_text()
    assert "img2dataset-like line" in log and "2it [00:02" in log
    assert "img2dataset-like line" not in out + err and "\r" not in out + err
    assert _lines(err) == [_lines(err)[0]] and _lines(err)[0].endswith(", done"), err
    # a failure shows the log's last lines (the redraws collapsed) with the error
    with pytest.raises(RuntimeError, match="boom"):
        with crawl_output(str(crawl_dir), total=10, count=lambda: 3, poll_s=0.05):
            subprocess.run([sys.executable, "-c", CHILD], check=True)
            raise RuntimeError("boom")
    out, err = capfd.readouterr()
    assert f"{LOG_NAME}; its last lines:" in err and "img2dataset-like line" in err and "\r" not in err
    assert (crawl_dir / LOG_NAME).read_text().count("img2dataset-like line") == 2  # appended
    # --verbose: left as it is
    monkeypatch.setenv("CLIP_VERBOSE", "1")
    with crawl_output(str(tmp_path / "verbose"), total=10, count=lambda: 10):
        subprocess.run([sys.executable, "-c", CHILD], check=True)
    out, err = capfd.readouterr()
    assert "img2dataset-like line" in out and not (tmp_path / "verbose" / LOG_NAME).exists()
