"""The OpenAI-compatible gateway: one bounded gate in front of every request to the child.

Built for cost per request, measured against the child alone (scripts/bench_gateway.py): an
asyncio protocol with llhttp (httptools) on both sides, and no framework in between.

* Proxied routes (those the backend has): the request's headers are passed on except the
  client's credentials and hop-by-hop headers; the child's per-spawn key is added. The response
  (status, headers, body, SSE chunks) is passed back byte for byte as it arrives, never buffered.
  Upstream connections are kept alive in a small pool.
* Own routes: ``/healthz`` (the supervisor is alive and has not given up), ``/readyz`` (200 only
  when READY and not refusing for resources), ``/metrics`` (Prometheus), ``/status`` (JSON; behind
  the token when tokens are set).
* Every proxied request passes the :class:`~supervisor.admission.AdmissionGate`: refused with 503 +
  Retry-After (not ready, draining, resource limits) or 429 + Retry-After (queue full, queue
  timeout), in the OpenAI error shape with a fixed :class:`~supervisor.policy.Reason` as ``code``.
* Client auth: bearer tokens from the environment variable named by ``gateway.tokens_env``,
  compared in constant time (as sha256 digests, so neither content nor length leaks).
* Limits: ``max_body_bytes`` (413), 32 KiB of request head (431), ``upstream_timeout_s`` (504).
  A client that disconnects aborts its upstream request and frees its slot at once.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import hmac
import json
import socket
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import anyio
import anyio.abc
import httptools
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from supervisor.admission import AdmissionGate, Ticket
from supervisor.backends import Backend
from supervisor.config import GatewayConfig
from supervisor.errors import SupervisorError
from supervisor.logging import EventRateLimiter, get_logger
from supervisor.policy import Lifecycle, LifecycleState, Reason, Verdict

__all__ = [
    "Gateway",
    "GatewayError",
    "GatewayMetrics",
    "MAX_HEAD_BYTES",
    "RuntimeView",
    "error_body",
    "load_tokens",
]

#: The largest request head (request line and headers) accepted.
MAX_HEAD_BYTES: Final = 32 * 1024
#: Idle upstream connections older than this are not reused (llama-server closes at 5 s).
_UPSTREAM_IDLE_S: Final = 3.0
#: Complete requests a client may pipeline before we stop reading from it.
_MAX_PIPELINED: Final = 8

_log = get_logger("gateway")

# Request headers never passed to the child: ours to set, or hop-by-hop (RFC 9110 7.6.1).
_DROP: Final = frozenset(
    {
        b"authorization",
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"expect",
    }
)

_STATUS_TEXT: Final = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}

# reason -> (HTTP status, OpenAI error type, fixed message, Retry-After seconds or None)
_REFUSALS: Final[dict[Reason, tuple[int, str, str, int | None]]] = {
    Reason.NOT_READY: (503, "unavailable_error", "the model server is not ready", 2),
    Reason.DRAINING: (503, "unavailable_error", "the model server is draining", 2),
    Reason.RESTART_LIMIT: (503, "unavailable_error", "the model server kept failing; stopped", 30),
    Reason.RAM_OVER_LIMIT: (503, "unavailable_error", "the model server is over its RAM limit", 5),
    Reason.VRAM_OVER_LIMIT: (503, "unavailable_error", "the model server is over its VRAM limit", 5),  # noqa: E501
    Reason.CPU_OVER_LIMIT: (503, "unavailable_error", "the model server is over its CPU limit", 5),
    Reason.RESOURCE_NOT_OBSERVED: (503, "unavailable_error", "a limit cannot be observed", 5),
    Reason.QUEUE_FULL: (429, "rate_limit_error", "too many requests are waiting", 1),
    Reason.QUEUE_TIMEOUT: (429, "rate_limit_error", "the request waited too long", 1),
    Reason.UNAUTHORIZED: (401, "authentication_error", "a valid bearer token is required", None),
    Reason.NOT_FOUND: (404, "invalid_request_error", "no such route", None),
    Reason.METHOD_NOT_ALLOWED: (405, "invalid_request_error", "method not allowed here", None),
    Reason.BODY_TOO_LARGE: (413, "invalid_request_error", "the request body is too large", None),
    Reason.HEADERS_TOO_LARGE: (431, "invalid_request_error", "the request head is too large", None),
    Reason.BAD_REQUEST: (400, "invalid_request_error", "the request is not valid HTTP", None),
    Reason.UPSTREAM_ERROR: (502, "upstream_error", "the model server failed to answer", None),
    Reason.UPSTREAM_TIMEOUT: (504, "upstream_error", "the model server took too long", None),
    Reason.MALFORMED_INPUT: (500, "server_error", "the request could not be evaluated", None),
}  # fmt: skip


class GatewayError(SupervisorError):
    """The gateway could not be served."""

    default_reason = Reason.LISTEN_FAILED


def error_body(reason: Reason) -> bytes:
    """The OpenAI-shaped error body for a refusal: fixed message, the reason as ``code``."""
    _status, kind, message, _retry = _REFUSALS.get(reason, _REFUSALS[Reason.MALFORMED_INPUT])
    return json.dumps({"error": {"message": message, "type": kind, "code": reason.value}}).encode()


def _response(
    status: int,
    body: bytes,
    *,
    content_type: bytes = b"application/json",
    keep_alive: bool = True,
    extra: Iterable[tuple[bytes, bytes]] = (),
    head_only: bool = False,
) -> bytes:
    lines = [
        b"HTTP/1.1 %d %s" % (status, _STATUS_TEXT.get(status, b"Unknown")),
        b"Content-Type: " + content_type,
        b"Content-Length: %d" % len(body),
        b"Connection: keep-alive" if keep_alive else b"Connection: close",
    ]
    lines.extend(name + b": " + value for name, value in extra)
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head_only else body)


_ERROR_CACHE: dict[tuple[Reason, bool, bool], bytes] = {}


def _error_response(reason: Reason, *, keep_alive: bool = True, head_only: bool = False) -> bytes:
    key = (reason, keep_alive, head_only)
    cached = _ERROR_CACHE.get(key)
    if cached is None:
        status, _kind, _message, retry = _REFUSALS.get(reason, _REFUSALS[Reason.MALFORMED_INPUT])
        extra = [(b"Retry-After", str(retry).encode())] if retry is not None else []
        if reason is Reason.UNAUTHORIZED:
            extra.append((b"WWW-Authenticate", b"Bearer"))
        cached = _response(
            status, error_body(reason), keep_alive=keep_alive, extra=extra, head_only=head_only
        )
        _ERROR_CACHE[key] = cached
    return cached


def load_tokens(value: str | None) -> tuple[bytes, ...]:
    """Comma-separated bearer tokens -> their sha256 digests (compared in constant time)."""
    if not value:
        return ()
    return tuple(
        hashlib.sha256(token.strip().encode()).digest()
        for token in value.split(",")
        if token.strip()
    )


def _token_ok(header: bytes | None, digests: tuple[bytes, ...]) -> bool:
    if not digests:
        return True
    if header is None or len(header) < 8 or header[:7].lower() != b"bearer ":
        return False
    presented = hashlib.sha256(header[7:].strip()).digest()
    ok = False
    for digest in digests:  # every digest compared: no early exit
        ok |= hmac.compare_digest(presented, digest)
    return ok


class RuntimeView(Protocol):
    """What the gateway reads from the runtime."""

    @property
    def lifecycle(self) -> Lifecycle: ...

    @property
    def upstream_target(self) -> tuple[str, int, str] | None:
        """(host, port, key) of the ready child, else None."""

    @property
    def stop_reason(self) -> Reason | None: ...

    def status(self) -> dict[str, Any]: ...

    def refusing_reason(self) -> Reason | None:
        """The resource reason requests are refused for now (the watchdog's view), else None."""


# ------------------------------------------------------------------------------------------------
# metrics


class _Histogram:
    """A histogram without locks: the gateway's event loop is its only writer."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append((repr(float(bound)), running))
        out.append(("+Inf", self.count))
        return out


_QUEUE_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60)
_LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
)  # fmt: skip


class GatewayMetrics(Collector):
    """Request metrics kept as plain numbers on the hot path (one event loop writes them) and
    rendered into Prometheus families, by prometheus_client, at scrape time."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.refusals: dict[Reason, int] = {}
        self.queue_wait = _Histogram(_QUEUE_BUCKETS)
        self.upstream_latency: dict[str, _Histogram] = {}

    def count(self, route: str, status: int) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def refused(self, reason: Reason) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

    def latency(self, route: str, seconds: float) -> None:
        histogram = self.upstream_latency.get(route)
        if histogram is None:
            histogram = self.upstream_latency[route] = _Histogram(_LATENCY_BUCKETS)
        histogram.observe(seconds)

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "llama_supervisor_requests",
            "Requests answered, by route and status.",
            labels=["route", "status"],
        )
        for (route, status), value in sorted(self.requests.items()):
            requests.add_metric([route, str(status)], value)
        refusals = CounterMetricFamily(
            "llama_supervisor_refusals",
            "Requests refused by the gateway, by reason.",
            labels=["reason"],
        )
        for reason, value in sorted(self.refusals.items()):
            refusals.add_metric([reason.value], value)
        wait = HistogramMetricFamily(
            "llama_supervisor_queue_wait_seconds", "Time requests waited in the admission queue."
        )
        wait.add_metric([], self.queue_wait.buckets(), self.queue_wait.total)
        latency = HistogramMetricFamily(
            "llama_supervisor_upstream_latency_seconds",
            "Time from sending a request to the child to the end of its answer.",
            labels=["route"],
        )
        for route, histogram in sorted(self.upstream_latency.items()):
            latency.add_metric([route], histogram.buckets(), histogram.total)
        yield from (requests, refusals, wait, latency)


class _RuntimeCollector(Collector):
    """Values read from the runtime at scrape time: nothing to update on the hot path."""

    def __init__(self, view: RuntimeView, gate: AdmissionGate, pool: _UpstreamPool) -> None:
        self.view = view
        self.gate = gate
        self.pool = pool

    def collect(self) -> Iterable[Metric]:
        in_flight = GaugeMetricFamily("llama_supervisor_in_flight", "Requests at the child now.")
        in_flight.add_metric([], self.gate.in_flight)
        queued = GaugeMetricFamily("llama_supervisor_queued", "Requests waiting for a slot now.")
        queued.add_metric([], self.gate.queued)
        state = GaugeMetricFamily(
            "llama_supervisor_lifecycle_state",
            "1 for the current lifecycle state.",
            labels=["state"],
        )
        current = self.view.lifecycle.state
        for candidate in LifecycleState:
            state.add_metric([candidate.value], 1.0 if candidate is current else 0.0)
        opened = CounterMetricFamily(
            "llama_supervisor_upstream_connections", "Connections opened to the child."
        )
        opened.add_metric([], self.pool.opened)
        retried = CounterMetricFamily(
            "llama_supervisor_upstream_retries",
            "Requests resent on a fresh connection after a kept-alive one was found closed.",
        )
        retried.add_metric([], self.pool.retried)
        yield from (in_flight, queued, state, opened, retried)
        status = self.view.status()
        restarts = CounterMetricFamily("llama_supervisor_restarts", "Child restarts.")
        restarts.add_metric([], status.get("restarts", 0))
        fetched = CounterMetricFamily(
            "llama_supervisor_fetch_bytes", "Model bytes fetched and hashed."
        )
        fetched.add_metric([], status.get("fetch_bytes", 0))
        yield from (restarts, fetched)
        resources = status.get("resources") or {}
        for key, help_text in (
            ("ram_bytes", "RSS of the child and its descendants."),
            ("vram_bytes", "GPU memory used by the child."),
            ("cpu_percent", "CPU use of the child, percent of one CPU."),
            ("system_available_bytes", "Memory available on the system."),
            ("cgroup_limit_bytes", "The cgroup v2 memory limit."),
        ):
            value = resources.get(key)
            if isinstance(value, int | float):
                gauge = GaugeMetricFamily(f"llama_supervisor_{key}", help_text)
                gauge.add_metric([], float(value))
                yield gauge
        actions = status.get("watchdog_actions") or {}
        family = CounterMetricFamily(
            "llama_supervisor_watchdog_actions", "Watchdog actions, by action.", labels=["action"]
        )
        for action, count in actions.items():
            family.add_metric([action], count)
        yield family


# ------------------------------------------------------------------------------------------------
# requests


def _no_delay(transport: asyncio.BaseTransport) -> asyncio.Transport:
    """Small writes go out at once (request heads, SSE events): no Nagle delay."""
    assert isinstance(transport, asyncio.Transport)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return transport


class _Request:
    __slots__ = (
        "authorization",
        "body",
        "body_size",
        "error",
        "expect_continue",
        "head_size",
        "headers",
        "keep_alive",
        "method",
        "path",
        "target",
        "version",
    )

    def __init__(self) -> None:
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.body_size = 0
        self.head_size = 0
        self.error: Reason | None = None
        self.expect_continue = False
        self.keep_alive = True
        self.method = b"GET"
        self.version = "1.1"
        self.path = ""
        self.authorization: bytes | None = None


@dataclass(slots=True, eq=False)
class _Exchange:
    """One proxied request in flight."""

    client: _ClientConnection
    request: _Request
    route: str
    started: float
    deadline: float
    upstream: _UpstreamConnection | None = None
    sent_bytes: int = 0
    status: int = 0
    reused: bool = False
    retried: bool = False
    finished: bool = False


class _UpstreamConnection(asyncio.Protocol):
    """A keep-alive connection to the child; carries one exchange at a time."""

    def __init__(self, pool: _UpstreamPool, generation: int) -> None:
        self.pool = pool
        self.generation = generation
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: _Exchange | None = None
        self.idle_since = 0.0
        self.closed = False
        self._complete = False
        self._keep_alive = False
        self._streamed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = _no_delay(transport)

    def send(self, exchange: _Exchange, data: bytes) -> None:
        assert self.transport is not None
        self.exchange = exchange
        self._complete = False
        self._streamed = False
        self.parser = httptools.HttpResponseParser(self)
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # nothing asked: the child spoke out of turn
            self.abort()
            return
        exchange.sent_bytes += len(data)
        exchange.client.write(data)  # byte for byte, as it arrives
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            exchange.client.upstream_failed(exchange)
            self.abort()
            return
        if self._complete:
            self.exchange = None
            if self._keep_alive:
                self.pool.put(self)
            else:
                self.abort()
            exchange.client.upstream_done(exchange)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if (
            len(name) == 12
            and name.lower() == b"content-type"
            and value.startswith(b"text/event-stream")
        ):
            self._streamed = True

    def on_headers_complete(self) -> None:
        if self.exchange is not None:
            self.exchange.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        self._complete = True
        # Read it now: llhttp forgets the connection's keep-alive once the message is done.
        # llama-server closes its side after every event stream whatever its headers say, and a
        # reused dead connection costs a failed write and a retry: streams are not reused.
        self._keep_alive = self.parser.should_keep_alive() and not self._streamed

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        exchange = self.exchange
        self.exchange = None
        if exchange is not None and not exchange.finished:
            exchange.client.upstream_failed(exchange)

    def abort(self) -> None:
        self.closed = True
        self.exchange = None
        if self.transport is not None:
            self.transport.abort()


class _UpstreamPool:
    """Keep-alive connections to the current child; a new child empties the pool."""

    def __init__(self) -> None:
        self.idle: list[_UpstreamConnection] = []
        self.target: tuple[str, int, str] | None = None
        self.generation = 0
        self.prefix = b""
        self.connecting = 0
        self.opened = 0  # connections opened to the child (for /metrics)
        self.retried = 0  # requests resent after a kept-alive connection was found closed

    def ensure_spare(self) -> None:
        """Keep one connection open and idle: llama-server closes its connection after every
        stream, and a connect on the request's path costs a round trip."""
        if self.target is None or self.idle or self.connecting:
            return
        host, port, _key = self.target
        generation = self.generation
        loop = asyncio.get_running_loop()
        self.connecting += 1
        self.opened += 1
        task = loop.create_task(
            loop.create_connection(lambda: _UpstreamConnection(self, generation), host, port)
        )

        def connected(
            done: asyncio.Task[tuple[asyncio.BaseTransport, _UpstreamConnection]],
        ) -> None:
            self.connecting -= 1
            if not done.cancelled() and done.exception() is None:
                self.put(done.result()[1])

        task.add_done_callback(connected)

    def retarget(self, target: tuple[str, int, str] | None) -> None:
        if target == self.target:
            return
        self.target = target
        self.generation += 1
        for connection in self.idle:
            connection.abort()
        self.idle.clear()
        if target is not None:
            host, port, key = target
            self.prefix = b"Host: %s:%d\r\nAuthorization: Bearer %s\r\n" % (
                host.encode(),
                port,
                key.encode(),
            )

    def take(self) -> _UpstreamConnection | None:
        now = time.monotonic()
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed and now - connection.idle_since < _UPSTREAM_IDLE_S:
                return connection
            connection.abort()
        return None

    def put(self, connection: _UpstreamConnection) -> None:
        if connection.generation != self.generation or connection.closed:
            connection.abort()
            return
        connection.idle_since = time.monotonic()
        self.idle.append(connection)

    def forget(self, connection: _UpstreamConnection) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(connection)

    def close(self) -> None:
        for connection in self.idle:
            connection.abort()
        self.idle.clear()


class _ClientConnection(asyncio.Protocol):
    """One client connection: parses requests, answers own routes, proxies the rest."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.current: _Request | None = None
        self.pending: deque[_Request] = deque()
        self.exchange: _Exchange | None = None
        self.ticket: Ticket | None = None
        self.busy = False
        self.closed = False
        self.reading_paused = False

    # -- transport events -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = _no_delay(transport)
        self.gateway.connections.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(Reason.BAD_REQUEST)
            return
        except httptools.HttpParserError:
            request = self.current
            reason = request.error if request is not None and request.error else Reason.BAD_REQUEST
            self._fail(reason)
            return
        if len(self.pending) >= _MAX_PIPELINED and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.gateway.connections.discard(self)
        self.pending.clear()
        if self.ticket is not None:  # waiting in the queue: leave it now
            self.ticket.cancel()
            self.ticket = None
            self.busy = False
        exchange = self.exchange
        if exchange is not None and not exchange.finished:
            # The client is gone: stop the child's work and free the slot at once.
            self._finish(exchange, aborted=True)

    def pause_writing(self) -> None:
        exchange = self.exchange
        if exchange is not None and exchange.upstream is not None and exchange.upstream.transport:
            exchange.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        exchange = self.exchange
        if exchange is not None and exchange.upstream is not None and exchange.upstream.transport:
            exchange.upstream.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def _fail(self, reason: Reason) -> None:
        """Answer an unrecoverable protocol error and close."""
        self.gateway.metrics.refused(reason)
        self.gateway.metrics.count("other", _REFUSALS[reason][0])
        self.write(_error_response(reason, keep_alive=False))
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.current = _Request()

    def on_url(self, url: bytes) -> None:
        request = self.current
        assert request is not None
        request.target += url
        request.head_size += len(url)
        if request.head_size > MAX_HEAD_BYTES:
            request.error = Reason.HEADERS_TOO_LARGE
            raise httptools.HttpParserError("head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.current
        assert request is not None
        request.head_size += len(name) + len(value) + 4
        if request.head_size > MAX_HEAD_BYTES:
            request.error = Reason.HEADERS_TOO_LARGE
            raise httptools.HttpParserError("head too large")
        lower = name.lower()
        if lower == b"authorization":
            request.authorization = value
        elif lower == b"expect":
            request.expect_continue = value.lower() == b"100-continue"
        elif (
            lower == b"content-length"
            and value.strip().isdigit()
            and int(value) > self.gateway.config.max_body_bytes
        ):
            request.error = Reason.BODY_TOO_LARGE
            raise httptools.HttpParserError("body too large")
        request.headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self.current
        assert request is not None
        request.method = self.parser.get_method()
        request.version = self.parser.get_http_version()
        request.keep_alive = self.parser.should_keep_alive()
        request.path = request.target.split(b"?", 1)[0].decode("latin-1")
        if request.expect_continue:
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        request = self.current
        assert request is not None
        request.body_size += len(body)
        if request.body_size > self.gateway.config.max_body_bytes:
            request.error = Reason.BODY_TOO_LARGE
            raise httptools.HttpParserError("body too large")
        request.body.append(body)

    def on_message_complete(self) -> None:
        request = self.current
        assert request is not None
        self.pending.append(request)
        self.current = None

    # -- dispatch -----------------------------------------------------------------------------

    def _next(self) -> None:
        while not self.busy and self.pending and not self.closed:
            request = self.pending.popleft()
            self.gateway.dispatch(self, request)
        if self.reading_paused and not self.pending and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    def answered(self, request: _Request) -> None:
        """A response was written whole; go on with the next request, or close."""
        self.busy = False
        if not request.keep_alive:
            self.close()
            return
        self._next()

    # -- proxying -----------------------------------------------------------------------------

    def start_exchange(self, request: _Request, route: str, waited: float) -> None:
        """Holding a slot: send the request to the child."""
        gateway = self.gateway
        now = time.monotonic()
        exchange = _Exchange(self, request, route, now, now + gateway.config.upstream_timeout_s)
        self.exchange = exchange
        if waited:
            gateway.metrics.queue_wait.observe(waited)
        gateway.active.add(exchange)
        gateway.send_upstream(exchange)

    def timed_out(self, exchange: _Exchange) -> None:
        if exchange.finished:
            return
        if exchange.sent_bytes == 0:
            self._finish(exchange, refusal=Reason.UPSTREAM_TIMEOUT)
        else:  # half an answer is out: all we can do is cut it
            self._finish(exchange, aborted=True)
            self.close()

    def upstream_done(self, exchange: _Exchange) -> None:
        self._finish(exchange)

    def upstream_failed(self, exchange: _Exchange) -> None:
        if exchange.finished:
            return
        if exchange.sent_bytes == 0 and exchange.reused and not exchange.retried:
            # A kept-alive connection the child closed as we reused it: try once on a fresh one.
            exchange.retried = True
            exchange.upstream = None
            self.gateway.pool.retried += 1
            self.gateway.send_upstream(exchange, fresh=True)
            return
        if exchange.sent_bytes == 0:
            self._finish(exchange, refusal=Reason.UPSTREAM_ERROR)
        else:
            self._finish(exchange, aborted=True)
            self.close()

    def _finish(
        self, exchange: _Exchange, *, refusal: Reason | None = None, aborted: bool = False
    ) -> None:
        exchange.finished = True
        self.gateway.active.discard(exchange)
        upstream = exchange.upstream
        if upstream is not None and (aborted or refusal is not None):
            upstream.abort()
        gateway = self.gateway
        gateway.gate.release()
        self.exchange = None
        if refusal is not None:
            gateway.refuse(self, exchange.request, refusal, route=exchange.route)
            return
        gateway.metrics.latency(exchange.route, time.monotonic() - exchange.started)
        gateway.metrics.count(exchange.route, exchange.status or 499)
        gateway.pool.ensure_spare()
        if aborted:
            self.busy = False
            return
        self.answered(exchange.request)


class Gateway:
    """The gateway server; run :meth:`serve` inside the supervisor's task group."""

    def __init__(
        self,
        *,
        config: GatewayConfig,
        gate: AdmissionGate,
        view: RuntimeView,
        backend: Backend,
        tokens: tuple[bytes, ...] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.gate = gate
        self.view = view
        self.backend = backend
        self.tokens = tokens
        self.registry = registry or CollectorRegistry()
        self.metrics = GatewayMetrics()
        self.registry.register(self.metrics)
        self.pool = _UpstreamPool()
        self.registry.register(_RuntimeCollector(view, gate, self.pool))
        self.connections: set[_ClientConnection] = set()
        self.active: set[_Exchange] = set()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._refusal_log = EventRateLimiter(1.0)
        self._routes = {route: route for route in backend.routes}

    # -- serving --------------------------------------------------------------------------------

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen until cancelled; ``task_status.started(port)`` once listening."""
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: _ClientConnection(self),
                host=self.config.host,
                port=self.config.port,
                reuse_address=True,
                backlog=1024,
            )
        except OSError:
            raise GatewayError(
                "the gateway cannot listen on gateway.host and gateway.port",
                reason=Reason.LISTEN_FAILED,
            ) from None
        sockets = self._server.sockets
        self.port = sockets[0].getsockname()[1] if sockets else self.config.port
        _log.info("gateway.listening", host=self.config.host, port=self.port)
        task_status.started(self.port)
        try:
            while True:  # one sweep a second enforces upstream_timeout_s: no timer per request
                await anyio.sleep(1.0)
                self._sweep()
        finally:
            with anyio.CancelScope(shield=True):
                self._server.close()
                for connection in list(self.connections):
                    connection.close()
                self.pool.close()
                with anyio.move_on_after(2):
                    await self._server.wait_closed()

    def _sweep(self) -> None:
        now = time.monotonic()
        for exchange in [e for e in self.active if e.deadline <= now]:
            exchange.client.timed_out(exchange)

    # -- routing ----------------------------------------------------------------------------------

    def dispatch(self, client: _ClientConnection, request: _Request) -> None:
        client.busy = True
        if request.error is not None:
            self.refuse(client, request, request.error, route="other")
            return
        path = request.path
        route = self._routes.get(path)
        if route is None:
            self._own_route(client, request, path)
            return
        if not _token_ok(request.authorization, self.tokens):
            self.refuse(client, request, Reason.UNAUTHORIZED, route=route)
            return
        if request.method == b"HEAD":
            self.refuse(client, request, Reason.METHOD_NOT_ALLOWED, route=route)
            return
        verdict = self.gate.try_acquire()
        if verdict.ok:
            client.start_exchange(request, route, 0.0)
            return
        if verdict.reason == Reason.AT_CAPACITY:

            def granted(result: Verdict, waited: float) -> None:
                client.ticket = None
                if client.closed:
                    if result.ok:
                        self.gate.release()
                    return
                if result.ok:
                    client.start_exchange(request, route, waited)
                else:
                    self.refuse(client, request, self._reason(result), route=route)

            ticket = self.gate.enqueue(granted)
            if isinstance(ticket, Ticket):
                client.ticket = ticket
                return
            verdict = ticket
        self.refuse(client, request, self._reason(verdict), route=route)

    def _reason(self, verdict: Verdict) -> Reason:
        reason = Reason(verdict.reason)
        if reason is Reason.NOT_READY and self.view.stop_reason is not None:
            return self.view.stop_reason  # gave up: say why
        return reason

    def refuse(
        self, client: _ClientConnection, request: _Request, reason: Reason, *, route: str
    ) -> None:
        client.write(
            _error_response(
                reason, keep_alive=request.keep_alive, head_only=request.method == b"HEAD"
            )
        )
        self.metrics.refused(reason)
        self.metrics.count(route, _REFUSALS.get(reason, _REFUSALS[Reason.MALFORMED_INPUT])[0])
        suppressed = self._refusal_log.allow(reason.value)
        if suppressed is not None:
            _log.info("gateway.refused", reason=reason.value, route=route, suppressed=suppressed)
        client.answered(request)

    def send_upstream(self, exchange: _Exchange, *, fresh: bool = False) -> None:
        target = self.view.upstream_target
        self.pool.retarget(target)
        if target is None:
            exchange.client.upstream_failed(exchange)
            return
        request = exchange.request
        body = b"".join(request.body)
        head = [
            b"%s %s HTTP/%s\r\n" % (request.method, request.target, request.version.encode()),
            self.pool.prefix,
        ]
        for name, value in request.headers:
            if name.lower() not in _DROP:
                head.append(name + b": " + value + b"\r\n")
        if body or request.method in (b"POST", b"PUT", b"PATCH"):
            head.append(b"Content-Length: %d\r\n" % len(body))
        head.append(b"\r\n")
        data = b"".join(head) + body
        connection = None if fresh else self.pool.take()
        if connection is not None:
            exchange.upstream = connection
            exchange.reused = True
            connection.send(exchange, data)
            return
        host, port, _key = target
        generation = self.pool.generation
        self.pool.opened += 1
        loop = asyncio.get_running_loop()
        task = loop.create_task(
            loop.create_connection(lambda: _UpstreamConnection(self.pool, generation), host, port)
        )

        def connected(
            done: asyncio.Task[tuple[asyncio.BaseTransport, _UpstreamConnection]],
        ) -> None:
            if done.cancelled() or done.exception() is not None:
                exchange.client.upstream_failed(exchange)
                return
            _transport, upstream = done.result()
            if exchange.finished:
                upstream.abort()
                return
            exchange.upstream = upstream
            exchange.reused = False
            upstream.send(exchange, data)

        task.add_done_callback(connected)

    # -- own routes -----------------------------------------------------------------------------

    def _own_route(self, client: _ClientConnection, request: _Request, path: str) -> None:
        if path not in ("/healthz", "/readyz", "/metrics", "/status"):
            self.refuse(client, request, Reason.NOT_FOUND, route="other")
            return
        if request.method not in (b"GET", b"HEAD"):
            self.refuse(client, request, Reason.METHOD_NOT_ALLOWED, route=path)
            return
        head_only = request.method == b"HEAD"
        keep_alive = request.keep_alive
        if path == "/healthz":
            alive = self.view.stop_reason is None
            body = json.dumps({"status": "ok" if alive else "failed"}).encode()
            status = 200 if alive else 503
            data = _response(status, body, keep_alive=keep_alive, head_only=head_only)
        elif path == "/readyz":
            lifecycle = self.view.lifecycle.state
            refusing = self.view.refusing_reason()
            ready = lifecycle is LifecycleState.READY and refusing is None
            payload: dict[str, Any] = {"ready": ready, "state": lifecycle.value}
            if refusing is not None:
                payload["reason"] = refusing.value
            elif not ready and self.view.stop_reason is not None:
                payload["reason"] = self.view.stop_reason.value
            status = 200 if ready else 503
            extra = [] if ready else [(b"Retry-After", b"2")]
            data = _response(
                status,
                json.dumps(payload).encode(),
                keep_alive=keep_alive,
                extra=extra,
                head_only=head_only,
            )
        elif path == "/metrics":
            status = 200
            data = _response(
                200,
                generate_latest(self.registry),
                content_type=b"text/plain; version=0.0.4; charset=utf-8",
                keep_alive=keep_alive,
                head_only=head_only,
            )
        else:  # /status
            if not _token_ok(request.authorization, self.tokens):
                self.refuse(client, request, Reason.UNAUTHORIZED, route=path)
                return
            status_doc = dict(self.view.status())
            status_doc["in_flight"] = self.gate.in_flight
            status_doc["queued"] = self.gate.queued
            status = 200
            data = _response(
                200, json.dumps(status_doc).encode(), keep_alive=keep_alive, head_only=head_only
            )
        client.write(data)
        self.metrics.count(path, status)
        client.answered(request)
