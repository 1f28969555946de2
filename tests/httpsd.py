"""A real HTTPS (or plain HTTP) server on 127.0.0.1 for fetch tests, with scriptable routes.

Each route is a function of the request handler; it writes whatever status, headers and bytes the
test needs (honest, lying, stalling, dropping). The server records every request it receives and
how many body bytes it managed to send, so tests can assert what was (and was not) contacted.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

Route = Callable[["Handler"], None]


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]


@dataclass
class ServerLog:
    requests: list[Recorded] = field(default_factory=list)
    body_bytes_sent: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, path: str) -> int:
        with self.lock:
            return sum(1 for r in self.requests if r.path == path)

    def for_path(self, path: str) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.path == path]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        log = self.server.log
        with log.lock:
            log.requests.append(Recorded(path, {k.lower(): v for k, v in self.headers.items()}))
        route = self.server.routes.get(path)
        if route is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        try:
            route(self)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            self.close_connection = True

    # -- helpers for routes ------------------------------------------------------------------

    def request_range_start(self) -> int | None:
        value = self.headers.get("Range")
        if value is None or not value.startswith("bytes=") or not value.endswith("-"):
            return None
        start = value[len("bytes=") : -1]
        return int(start) if start.isdigit() else None

    def send_body(self, data: bytes, *, chunk: int = 64 * 1024, pause_s: float = 0.0) -> None:
        path = self.path.split("?", 1)[0]
        view = memoryview(data)
        for start in range(0, len(view), chunk):
            piece = view[start : start + chunk]
            self.wfile.write(piece)
            with self.server.log.lock:
                sent = self.server.log.body_bytes_sent
                sent[path] = sent.get(path, 0) + len(piece)
            if pause_s:
                time.sleep(pause_s)
        self.wfile.flush()

    def serve(
        self,
        data: bytes,
        *,
        honour_range: bool = True,
        content_length: int | str | None = "auto",
        pause_s: float = 0.0,
        close: bool = False,
    ) -> None:
        """Serve ``data`` like a static file server (206 for a Range request when honoured)."""
        start = self.request_range_start() if honour_range else None
        if start is not None and start < len(data):
            body = data[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        if content_length == "auto":
            self.send_header("Content-Length", str(len(body)))
        elif isinstance(content_length, int):
            self.send_header("Content-Length", str(content_length))
        if close or content_length is None:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        self.send_body(body, pause_s=pause_s)

    def redirect(self, location: str, status: int = 302) -> None:
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def status(self, code: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def drop(self) -> None:
        """Close the TCP connection at once, mid-response."""
        self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    log: ServerLog
    routes: dict[str, Route]


class LoopbackServer:
    """``with LoopbackServer(ssl_context) as server: server.url('/m.gguf')``."""

    def __init__(self, ssl_context: ssl.SSLContext | None) -> None:
        self.log = ServerLog()
        self.routes: dict[str, Route] = {}
        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._httpd.log = self.log
        self._httpd.routes = self.routes
        if ssl_context is not None:
            self._httpd.socket = ssl_context.wrap_socket(self._httpd.socket, server_side=True)
        self.scheme = "https" if ssl_context is not None else "http"
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def origin(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.origin + path

    def route(self, path: str) -> Callable[[Route], Route]:
        def register(fn: Route) -> Route:
            self.routes[path] = fn
            return fn

        return register

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
