"""A loopback HTTP server for the crawl's politeness, retry and deadline tests: each path
answers from a script (one step per request, the last step repeats), and the server
records every request: path, User-Agent, start/end time and how many were in flight.

    srv = ScriptServer({"/a.jpg": [Step(429, {"Retry-After": "1"}), Step(200, body=JPEG)]}).start()
    srv.url("/a.jpg"); srv.count("/a.jpg"); srv.user_agents(); srv.max_in_flight; srv.stop()

Step kinds: a normal answer (status, headers, body, delay before it), ``"reset"`` (the
connection is closed with a TCP reset, nothing answered), ``"silent"`` (the request is
read and never answered), ``"drip"`` (200 with a declared length, one byte per second).
Paths without a script answer 404.
"""
from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Step:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0
    kind: str = "answer"  # answer | reset | silent | drip


@dataclass
class Request:
    path: str
    user_agent: str | None
    start: float
    end: float = 0.0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *a: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        owner = self.server.owner
        path = urlsplit(self.path).path
        rec = Request(path, self.headers.get("User-Agent"), time.monotonic())
        step = owner._begin(rec)
        try:
            self._play(step)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        finally:
            owner._end(rec)

    def _play(self, step: Step | None) -> None:
        if step is None:
            self.send_error(404)
            return
        if step.delay:
            time.sleep(step.delay)
        if step.kind == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if step.kind == "silent":
            self.server.owner._stopped.wait(120)
            self.close_connection = True
            return
        if step.kind == "drip":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                if self.server.owner._stopped.wait(1.0):
                    break
                self.wfile.write(b"x")
                self.wfile.flush()
            self.close_connection = True
            return
        self.send_response(step.status)
        for k, v in step.headers.items():
            self.send_header(k, v)
        if "Content-Type" not in step.headers:
            self.send_header("Content-Type", "image/jpeg" if step.status == 200 else "text/plain")
        self.send_header("Content-Length", str(len(step.body)))
        self.end_headers()
        self.wfile.write(step.body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    owner: "ScriptServer"


class ScriptServer:
    def __init__(self, scripts: dict[str, list[Step]], host: str = "127.0.0.1") -> None:
        self.scripts = {p: list(s) for p, s in scripts.items()}
        self.host = host
        self.requests: list[Request] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._served: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._server: _Server | None = None

    def _begin(self, rec: Request) -> Step | None:
        with self._lock:
            self.requests.append(rec)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            script = self.scripts.get(rec.path)
            i = self._served[rec.path]
            self._served[rec.path] += 1
        if not script:
            return None
        return script[min(i, len(script) - 1)]

    def _end(self, rec: Request) -> None:
        with self._lock:
            rec.end = time.monotonic()
            self._in_flight -= 1

    def set_script(self, path: str, steps: list[Step]) -> None:
        with self._lock:
            self.scripts[path] = list(steps)
            self._served[path] = 0

    def count(self, path: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.path == path)

    def user_agents(self) -> set[str | None]:
        with self._lock:
            return {r.user_agent for r in self.requests}

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    def start(self) -> "ScriptServer":
        self._server = _Server((self.host, 0), _Handler)
        self._server.owner = self
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "ScriptServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
