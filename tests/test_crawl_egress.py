"""The crawl's egress proxy (data_pipeline.egress) in a real img2dataset crawl, and the
no-phone-home setting on import.

127.0.0.1 plays the public web (crawl.allowed_networks=[127.0.0.1/32]); 127.0.0.2 plays a
private service, a listener that counts every connection it gets. Names are answered by a
test resolver handed to the crawl (the URL check and the proxy alike), so no DNS query
leaves the machine: ``rebind.test`` answers 127.0.0.1 first and 127.0.0.2 afterwards, as a
rebinding DNS server would.

Run: .venv/bin/python -m pytest -q tests/test_crawl_egress.py   (~30-60 s)
"""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import data_server_cases as cases
from data_pipeline.serve import Behaviour, ImageServer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow]
CAP = 200_000
DEADLINE = 2.0


class AcceptCounter:
    """A TCP listener on the 'private' address that counts connections and closes them."""

    def __init__(self, host: str = "127.0.0.2") -> None:
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            c.close()

    def close(self) -> None:
        self._stop.set()
        self._t.join()
        self.sock.close()


class _Drip(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *a: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        try:
            if self.path == "/drip.jpg":  # declared length, one byte every 0.25 s: never a socket timeout
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.25)
            elif self.path == "/slowhead.jpg":  # answers after the deadline, before the socket timeout
                time.sleep(DEADLINE + 1.0)
                self.send_response(200)
                self.send_header("Content-Length", "1")
                self.end_headers()
                self.wfile.write(b"x")
            elif self.path == "/stream.jpg":  # no Content-Length: the cap cuts it mid-way
                self.send_response(200)
                self.end_headers()
                for _ in range(2 * CAP // 10_000):
                    self.wfile.write(b"y" * 10_000)
        except (BrokenPipeError, ConnectionResetError):
            pass


def _resolver():
    calls: dict[str, int] = {}

    def resolve(host: str, port: int) -> list[str]:
        calls[host] = calls.get(host, 0) + 1
        if host == "rebind.test":
            return ["127.0.0.1"] if calls[host] == 1 else ["127.0.0.2"]
        return []  # everything else: no answer (never a real DNS query)
    return resolve


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
    b = io.BytesIO()
    Image.fromarray(a).resize((128, 128), Image.NEAREST).save(b, "JPEG", quality=90)
    return b.getvalue()


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    from data_pipeline import pipeline
    from data_pipeline.config import load_config
    from data_pipeline.crawl import run_crawl

    tmp = tmp_path_factory.mktemp("egress")
    site = tmp / "site"
    site.mkdir()
    for i in range(3):
        (site / f"good_{i}.jpg").write_bytes(_jpeg(i))
    (site / "big.jpg").write_bytes(b"z" * (CAP + 1))
    private = AcceptCounter()
    p = f"http://127.0.0.2:{private.port}"
    behaviours = {
        "/to_private": Behaviour(status=302, headers={"Location": f"{p}/secret.jpg"}),
        "/to_ftp": Behaviour(status=302, headers={"Location": f"ftp://127.0.0.2:{private.port}/x.jpg"}),
        "/to_file": Behaviour(status=302, headers={"Location": "file:///etc/passwd"}),
        "/to_good": Behaviour(status=301, headers={"Location": "/good_2.jpg"}),
    }
    drip = ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    drip.daemon_threads = True
    threading.Thread(target=drip.serve_forever, daemon=True).start()
    d = f"http://127.0.0.1:{drip.server_address[1]}"
    with ImageServer(site, behaviours=behaviours) as srv:
        rows = [
            (srv.url("good_0.jpg"), cases.KEPT), (srv.url("good_1.jpg"), cases.KEPT),
            (srv.url("to_good"), cases.KEPT),
            (srv.url("to_private"), "safety/redirect_to_private"),
            (srv.url("to_ftp"), "safety/redirect_bad_scheme"),
            (srv.url("to_file"), "safety/redirect_bad_scheme"),
            (f"http://rebind.test:{private.port}/a.jpg", "safety/private_address"),
            ("http://nonexistent.invalid/a.jpg", "safety/unresolvable"),
            (srv.url("big.jpg"), "safety/body_too_large"),
            (f"{d}/stream.jpg", "download/truncated"),
            (f"{d}/drip.jpg", "download/deadline"),  # cut by the proxy at the deadline
            (f"{d}/slowhead.jpg", "safety/deadline"),
        ]
        pd.DataFrame({"url": [u for u, _ in rows],
                      "caption": [cases.PHRASES[i % len(cases.PHRASES)].format(c="shirt") + f" {i}"
                                  for i in range(len(rows))]}).to_parquet(tmp / "urls.parquet")
        cfg = load_config(None, [
            ("urls", str(tmp / "urls.parquet")), ("output", str(tmp / "out")), ("processes", 1),
            ("crawl.thread_count", 16), ("crawl.number_sample_per_shard", 100), ("crawl.timeout", 4.0),
            ("crawl.download_deadline", DEADLINE), ("crawl.max_body_bytes", CAP),
            ("crawl.allowed_networks", ["127.0.0.1/32"]),
        ] + list(cases.BUILD_OVERRIDES.items()))
        layout = pipeline.bind(cfg, with_input=True)
        summary = run_crawl(cfg, layout, resolver=_resolver())
        pipeline.filter(cfg)
        pipeline.shard(cfg)
        stats = pipeline.stats(cfg, echo=False)
    drip.shutdown()
    private.close()
    yield {"rows": rows, "stats": stats, "private": private, "summary": summary, "out": tmp / "out"}


def _expected(rows) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, r in rows:
        if r != cases.KEPT:
            out[r] = out.get(r, 0) + 1
    return out


@pytest.mark.timeout(240)
def test_every_refusal_counted_per_url_and_nothing_reaches_the_private_side(crawl) -> None:
    stats = crawl["stats"]
    assert crawl["private"].accepted == 0  # not one connection to 127.0.0.2
    assert stats["counts"] == _expected(crawl["rows"])
    assert (stats["rows_in"], stats["kept"], stats["unaccounted"]) == (12, 3, 0)


@pytest.mark.timeout(240)
def test_proxy_counts_each_reason_in_stats(crawl) -> None:
    eg = crawl["stats"]["egress"]
    assert eg == crawl["summary"].egress
    for reason, n in {"safety/redirect_to_private": 1, "safety/redirect_bad_scheme": 2,
                      "safety/private_address": 1, "safety/unresolvable": 1, "safety/deadline": 2,
                      "safety/body_too_large": 2}.items():
        assert eg.get(reason) == n, (reason, eg)
    md = (crawl["out"] / "stats.md").read_text()
    assert "| egress | safety/redirect_to_private | 1 |" in md and "| egress | safety/deadline | 2 |" in md


@pytest.mark.timeout(240)
def test_good_and_redirected_fetches_land_in_the_shards(crawl) -> None:
    captions = []
    for tar in sorted((crawl["out"] / "crawl").glob("*.tar")):
        with tarfile.open(tar) as tf:
            captions += [json.loads(tf.extractfile(m).read())["caption"] for m in tf if m.name.endswith(".json")]
    assert sorted(c.rsplit(" ", 1)[-1] for c in captions) == ["0", "1", "2"]


def test_tunnel_refused_cut_and_passed() -> None:
    """CONNECT (https): private target refused before connecting; bytes past the cap cut."""
    from data_pipeline.egress import EgressProxy
    from data_pipeline.safety import AddressPolicy

    private = AcceptCounter()
    big = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        c, _ = big.accept()
        c.recv(100)
        try:
            c.sendall(b"q" * (CAP * 3))
        except OSError:
            pass
        c.close()
    threading.Thread(target=serve, daemon=True).start()
    with EgressProxy(AddressPolicy(False, ["127.0.0.1/32"]), max_body_bytes=CAP, deadline=5) as px:
        with socket.create_connection(("127.0.0.1", px.port)) as s:
            s.sendall(b"CONNECT 127.0.0.2:%d HTTP/1.0\r\n\r\n" % private.port)
            assert s.recv(200).startswith(b"HTTP/1.1 403 safety/private_address")
        with socket.create_connection(("127.0.0.1", px.port)) as s:
            s.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.0\r\n\r\nhello" % big.getsockname()[1])
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        counts = px.counts()
    private.close()
    big.close()
    assert got.startswith(b"HTTP/1.1 200")
    assert len(got) - len(b"HTTP/1.1 200 Connection established\r\n\r\n") <= CAP
    assert private.accepted == 0
    assert counts["safety/private_address"] == 1 and counts["safety/body_too_large"] == 1


AUDIT = r"""
import json, sys
seen = []
def hook(event, args):
    if event == "socket.getaddrinfo":
        host = args[0]
    elif event == "socket.connect" and isinstance(args[1], tuple):
        host = args[1][0]
    else:
        return
    h = host.decode() if isinstance(host, bytes) else str(host)
    if h in ("127.0.0.1", "::1", "localhost") or h.startswith("127."):
        return
    seen.append([event, h])
    raise PermissionError("blocked by the test: " + h)  # nothing leaves the machine
sys.addaudithook(hook)
import importlib
importlib.import_module(sys.argv[1])
import img2dataset  # noqa: F401
print("SEEN=" + json.dumps(seen))
"""


@pytest.mark.parametrize("entry", ["data_pipeline", "data_pipeline.crawl", "data_pipeline.cli"])
def test_importing_img2dataset_never_phones_home(entry: str, tmp_path: Path) -> None:
    (tmp_path / "audit.py").write_text(AUDIT)
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, str(tmp_path / "audit.py"), entry], env=env, capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("SEEN=")][-1]
    assert json.loads(line[5:]) == []
