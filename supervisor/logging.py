"""structlog configuration, in one place, and the redaction processor.

JSON lines when stderr is not a terminal, the console renderer when it is. Every event passes
:func:`redact` last before rendering: it removes URL query strings (signed CDN URLs carry their
credential there), values of keys that name a secret, ``Bearer`` credentials, and any value
registered with :func:`register_secret` (the per-spawn API key, the client tokens) wherever it
appears.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import Any, Final, TextIO

import structlog

__all__ = [
    "EventRateLimiter",
    "REDACTED",
    "configure_logging",
    "forget_secret",
    "get_logger",
    "redact",
    "redact_text",
    "register_secret",
]

REDACTED: Final = "<redacted>"

_URL_QUERY = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s?#\"'<>]*)\?[^\s#\"'<>]*")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]+")
_SECRET_KEYS = re.compile(r"(?i)(token|secret|password|passwd|api[_-]?key|authorization|cookie)")
_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_secrets_pattern: re.Pattern[str] | None = None


def register_secret(value: str) -> None:
    """From now on, ``value`` is replaced by ``<redacted>`` wherever it appears in a log event."""
    global _secrets_pattern
    if len(value) < 4:  # too short to redact without mangling ordinary text
        return
    with _secrets_lock:
        _secrets.add(value)
        _secrets_pattern = re.compile(
            "|".join(re.escape(s) for s in sorted(_secrets, key=len, reverse=True))
        )


def forget_secret(value: str) -> None:
    """Stop redacting ``value`` (a per-spawn key whose child is gone)."""
    global _secrets_pattern
    with _secrets_lock:
        _secrets.discard(value)
        _secrets_pattern = (
            re.compile("|".join(re.escape(s) for s in sorted(_secrets, key=len, reverse=True)))
            if _secrets
            else None
        )


def redact_text(text: str) -> str:
    """``text`` without registered secrets, credentials after Bearer/Basic, or URL queries."""
    pattern = _secrets_pattern
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    return _URL_QUERY.sub(lambda m: f"{m.group(1)}?{REDACTED}", text)


def _redact_value(key: str, value: object) -> object:
    if _SECRET_KEYS.search(key) and value is not None and not isinstance(value, bool | int):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {str(k): _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(key, item) for item in value]
    return value


def redact(_logger: object, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor: scrub every value of the event (see the module docstring)."""
    for key in list(event_dict):
        event_dict[key] = _redact_value(key, event_dict[key])
    return event_dict


def configure_logging(
    *, json: bool | None = None, level: str = "info", stream: TextIO | None = None
) -> None:
    """Configure structlog for the process. ``json`` defaults to "stderr is not a terminal"."""
    out = stream if stream is not None else sys.stderr
    if json is None:
        json = not out.isatty()
    renderer: Callable[..., Any] = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # One write per event, under a lock: lines from worker threads never interleave.
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    """A structlog logger bound to a component name."""
    return structlog.get_logger(component=name)  # lazy: configuration may come later


class EventRateLimiter:
    """At most one event per ``interval_s`` per key; counts what it held back.

    ``allow(key)`` returns None when the event should be dropped, else the number of events of
    that key suppressed since the last one that was let through (to log as ``suppressed=N``).
    """

    def __init__(
        self, interval_s: float = 1.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)
