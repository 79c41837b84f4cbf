"""The local image server used by the crawl tests, benchmark and demo (data_pipeline.serve).

Run: .venv/bin/python -m pytest -q tests/test_crawl_serve.py
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from data_pipeline.serve import Behaviour, ImageServer

ROOT = Path(__file__).resolve().parents[1]


def fetch(url: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.mark.timeout(30)
def test_files_and_behaviours(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8jpegbytes")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.png").write_bytes(b"\x89PNG...")
    (tmp_path.parent / "secret.txt").write_text("outside the root")
    behaviours = {
        "/gone.jpg": Behaviour(status=404),
        "/boom.jpg": Behaviour(status=500),
        "/noai.jpg": Behaviour(headers={"X-Robots-Tag": "noai"}, body=b"img"),
        "/raw.jpg": Behaviour(body=b"<html>"),
        "/slow.jpg": Behaviour(delay=1.0, body=b"late"),
    }
    with ImageServer(tmp_path, behaviours=behaviours) as srv:
        assert srv.port > 0 and srv.base_url == f"http://127.0.0.1:{srv.port}"
        status, headers, body = fetch(srv.url("a.jpg"))
        assert (status, body, headers["Content-Type"]) == (200, b"\xff\xd8jpegbytes", "image/jpeg")
        assert fetch(srv.url("sub/b.png"))[2] == b"\x89PNG..."
        assert fetch(srv.url("gone.jpg"))[0] == 404
        assert fetch(srv.url("boom.jpg"))[0] == 500
        assert fetch(srv.url("missing.jpg"))[0] == 404
        assert fetch(srv.url("../secret.txt"))[0] == 404  # no escape from the root
        status, headers, body = fetch(srv.url("noai.jpg"))
        assert (status, headers["X-Robots-Tag"], body) == (200, "noai", b"img")
        assert fetch(srv.url("raw.jpg"))[2] == b"<html>"
        t0 = time.perf_counter()
        with pytest.raises((TimeoutError, urllib.error.URLError)):
            fetch(srv.url("slow.jpg"), timeout=0.3)
        assert fetch(srv.url("slow.jpg"), timeout=5)[2] == b"late"
        assert time.perf_counter() - t0 >= 1.0
        srv.set_behaviour("a.jpg", Behaviour(status=503))
        assert fetch(srv.url("a.jpg"))[0] == 503
        assert srv.requests["/a.jpg"] == 2 and srv.requests["/slow.jpg"] == 2
    t0 = time.perf_counter()
    srv2 = ImageServer(tmp_path, behaviours={"/hang": Behaviour(delay=30)}).start()
    try:
        fetch(srv2.url("hang"), timeout=0.2)
    except Exception:
        pass
    srv2.stop()  # a request still sleeping must not block stop()
    assert time.perf_counter() - t0 < 5


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_command_line_server(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "x.jpg").write_bytes(b"xyz")
    (tmp_path / "b.json").write_text(json.dumps({"/teapot": {"status": 418}, "y.txt": {"body_text": "hello"}}))
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "data_pipeline.serve", str(site), "--port", "0",
                             "--behaviours", str(tmp_path / "b.json"), "--port-file", str(port_file)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(200):
            if port_file.exists() and port_file.read_text().strip():
                break
            time.sleep(0.05)
        base = f"http://127.0.0.1:{int(port_file.read_text())}"
        assert fetch(base + "/x.jpg")[2] == b"xyz"
        assert fetch(base + "/teapot")[0] == 418
        assert fetch(base + "/y.txt")[2] == b"hello"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    assert f"serving {site} at {base}/" in out
