"""A local threaded HTTP server for images, with programmable per-path misbehaviour.

Serves the files under a directory and, for chosen paths, a status code, a delay, extra
headers (``X-Robots-Tag: noai``) or a raw body instead. Used by the tests, the build
benchmark and the demo to crawl a real HTTP server with no internet.

    from data_pipeline.serve import Behaviour, ImageServer
    with ImageServer("imgs/", behaviours={"/gone.jpg": Behaviour(status=404)}) as srv:
        srv.url("a.jpg")        # "http://127.0.0.1:<port>/a.jpg" (port 0 -> a free port)

    python -m data_pipeline.serve DIR [--port 0] [--behaviours FILE.json] [--port-file F]

A behaviours file maps a path to {"status", "delay", "headers", "body_text" | "body_b64"}.
"""
from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit


@dataclass
class Behaviour:
    """What to answer for one path. ``body=None`` serves the file under the root dir."""

    status: int = 200
    delay: float = 0.0  # seconds to wait before answering (slower than a crawl timeout)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Behaviour":
        body = None
        if "body_b64" in d:
            body = base64.b64decode(d["body_b64"])
        elif "body_text" in d:
            body = str(d["body_text"]).encode("utf-8")
        return cls(int(d.get("status", 200)), float(d.get("delay", 0.0)), dict(d.get("headers", {})), body)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet by default
        if self.server.owner.verbose:
            super().log_message(format, *args)

    def _answer(self, with_body: bool) -> None:
        owner = self.server.owner
        path = unquote(urlsplit(self.path).path)
        owner._count(path)
        b = owner.behaviours.get(path, Behaviour())
        if b.delay > 0:
            time.sleep(b.delay)
        body, ctype = b.body, "application/octet-stream"
        if body is None and b.status == 200:
            file = owner.resolve(path)
            if file is None:
                self.send_error(404)
                return
            body = file.read_bytes()
            ctype = mimetypes.guess_type(file.name)[0] or ctype
        elif body is None:
            body = f"{b.status}\n".encode()
            ctype = "text/plain"
        try:
            self.send_response(b.status)
            self.send_header("Content-Type", b.headers.get("Content-Type", ctype))
            self.send_header("Content-Length", str(len(body)))
            for k, v in b.headers.items():
                if k.lower() != "content-type":
                    self.send_header(k, v)
            self.end_headers()
            if with_body:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. its timeout fired during our delay)

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._answer(True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(False)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a delayed answer must not block stop()
    allow_reuse_address = True
    request_queue_size = 128
    owner: "ImageServer"


class ImageServer:
    """Threaded HTTP server on ``host:port`` (port 0 picks a free one); start()/stop()."""

    def __init__(
        self,
        root: str | Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        behaviours: dict[str, Behaviour] | None = None,
        verbose: bool = False,
    ) -> None:
        self.root = Path(root).resolve() if root is not None else None
        self.host, self.port = host, port
        self.behaviours: dict[str, Behaviour] = dict(behaviours or {})
        self.verbose = verbose
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def _count(self, path: str) -> None:
        with self._lock:
            self.requests[path] += 1

    def resolve(self, path: str) -> Path | None:
        """The file under root for a URL path, or None (also for paths escaping root)."""
        if self.root is None:
            return None
        candidate = (self.root / path.lstrip("/")).resolve()
        if self.root != candidate and self.root not in candidate.parents:
            return None
        return candidate if candidate.is_file() else None

    def set_behaviour(self, path: str, behaviour: Behaviour) -> None:
        self.behaviours["/" + path.lstrip("/")] = behaviour

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("server not started")
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def start(self) -> "ImageServer":
        self._server = _Server((self.host, self.port), _Handler)
        self._server.owner = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "ImageServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def load_behaviours(path: str) -> dict[str, Behaviour]:
    data = json.loads(Path(path).read_text())
    return {"/" + k.lstrip("/"): Behaviour.from_json(v) for k, v in data.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="directory whose files are served")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--behaviours", help="JSON file: path -> {status, delay, headers, body_text|body_b64}")
    ap.add_argument("--port-file", help="write the chosen port to this file once listening")
    ap.add_argument("--verbose", action="store_true", help="log every request")
    args = ap.parse_args(argv)
    if not Path(args.root).is_dir():
        ap.error(f"not a directory: {args.root}")
    srv = ImageServer(args.root, args.host, args.port, load_behaviours(args.behaviours) if args.behaviours else None,
                      verbose=args.verbose).start()
    if args.port_file:
        Path(args.port_file).write_text(f"{srv.port}\n")
    print(f"serving {args.root} at {srv.base_url}/", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
