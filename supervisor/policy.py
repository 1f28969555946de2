"""The pure decision core: reasons, verdicts, source and integrity checks, lifecycle, admission,
resource limits.

No I/O lives here, and no clock: the functions take values and return values, the way h11 keeps its
protocol state machine free of sockets. Everything that talks to the network, the disk or a child
process asks this module first and obeys its verdict.

Fail closed everywhere: None, wrong types, NaN, infinities, negatives and bools where numbers
are meant produce ``ok=False`` and never an exception (the integrity accumulator's constructor
and the value-object constructors aside, which reject bad arguments with a fixed message). No
verdict, reason or message carries an input value: reasons are the fixed codes of :class:`Reason`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import idna

__all__ = [
    "AdmissionState",
    "IntegrityAccumulator",
    "IntegritySpecError",
    "Lifecycle",
    "LifecycleEvent",
    "LifecycleState",
    "MAX_MODEL_SIZE_BYTES",
    "MAX_URL_LENGTH",
    "Reason",
    "ResourceLimits",
    "ResourceObservation",
    "TransitionResult",
    "Verdict",
    "can_serve_inference",
    "create_admission_state",
    "create_integrity_accumulator",
    "create_lifecycle_state",
    "create_resource_limits",
    "evaluate_admission",
    "evaluate_resource_limits",
    "evaluate_restart",
    "evaluate_runtime_request",
    "normalize_sha256",
    "record_dequeued",
    "record_in_flight",
    "record_queued",
    "record_released",
    "restart_backoff",
    "transition_lifecycle",
    "validate_allowlist",
    "validate_integrity_spec",
    "validate_source_url",
    "verify_model_bytes",
]

#: The largest model the integrity spec accepts: 2 TiB. Larger than any GGUF published today by an
#: order of magnitude, small enough that a typo of a few digits is caught before any byte moves.
MAX_MODEL_SIZE_BYTES: Final = 2 * 1024**4

#: URLs longer than this are refused unparsed (signed CDN URLs run to about 2 KiB).
MAX_URL_LENGTH: Final = 8192


class Reason(StrEnum):
    """The whole vocabulary of refusals: fixed codes, never free text, never an input value."""

    OK = "ok"
    # input and specification
    MALFORMED_SPEC = "malformed_spec"
    MALFORMED_INPUT = "malformed_input"
    # sources
    SCHEME_NOT_ALLOWED = "scheme_not_allowed"
    SOURCE_NOT_ALLOWED = "source_not_allowed"
    # integrity
    DIGEST_MISMATCH = "digest_mismatch"
    SIZE_MISMATCH = "size_mismatch"
    # lifecycle
    INVALID_TRANSITION = "invalid_transition"
    NOT_READY = "not_ready"
    DRAINING = "draining"
    # admission
    AT_CAPACITY = "at_capacity"
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    # resources
    RAM_OVER_LIMIT = "ram_over_limit"
    VRAM_OVER_LIMIT = "vram_over_limit"
    CPU_OVER_LIMIT = "cpu_over_limit"
    RESOURCE_NOT_OBSERVED = "resource_not_observed"
    # configuration
    INVALID_CONFIG = "invalid_config"
    # fetch and store
    NETWORK_ERROR = "network_error"
    HTTP_STATUS = "http_status"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    STALLED = "stalled"
    TLS_ERROR = "tls_error"
    DISK_FULL = "disk_full"
    STORE_ERROR = "store_error"
    MODEL_MISSING = "model_missing"
    # the child
    NOT_VERIFIED = "not_verified"
    SPAWN_FAILED = "spawn_failed"
    CHILD_EXITED = "child_exited"
    START_TIMEOUT = "start_timeout"
    UNHEALTHY = "unhealthy"
    RESTART_LIMIT = "restart_limit"
    # the gateway
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    BODY_TOO_LARGE = "body_too_large"
    HEADERS_TOO_LARGE = "headers_too_large"
    BAD_REQUEST = "bad_request"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    LISTEN_FAILED = "listen_failed"


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision: ``ok`` and one fixed :class:`Reason` code. Nothing else, so nothing can leak."""

    ok: bool
    reason: str


_OK: Final = Verdict(True, Reason.OK)


def _deny(reason: Reason) -> Verdict:
    return Verdict(False, reason)


class IntegritySpecError(TypeError, ValueError):
    """A bad integrity spec or source given to :func:`create_integrity_accumulator`.

    Both a ``TypeError`` (what the user's spec asserts) and a ``ValueError``; ``reason`` is the
    fixed code and the message is fixed text that never holds the URL or the digest.
    """

    def __init__(self, reason: Reason) -> None:
        super().__init__(f"integrity accumulator refused: {reason.value}")
        self.reason = reason


# ----------------------------------------------------------------------------------------------
# numbers


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A finite, non-negative int or float; bools are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value >= 0


# ----------------------------------------------------------------------------------------------
# integrity spec

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def normalize_sha256(digest: object) -> str | None:
    """The digest in lowercase when it is exactly 64 hex characters, else None."""
    if not isinstance(digest, str) or _HEX64.fullmatch(digest) is None:
        return None
    return digest.lower()


def validate_integrity_spec(digest: object, size_bytes: object) -> Verdict:
    """A sha256 of 64 hex characters (either case) and a size in 1..MAX_MODEL_SIZE_BYTES."""
    if normalize_sha256(digest) is None:
        return _deny(Reason.MALFORMED_SPEC)
    if not _is_int(size_bytes) or not 0 < size_bytes <= MAX_MODEL_SIZE_BYTES:  # type: ignore[operator]
        return _deny(Reason.MALFORMED_SPEC)
    return _OK


# ----------------------------------------------------------------------------------------------
# source URLs
#
# A hand-written parser, on purpose: it accepts a strict subset of WHATWG/RFC 3986 URLs and refuses
# everything a permissive parser might read differently (backslashes, userinfo, control characters,
# percent-encoded hosts, numeric IPv4 shorthands, encoded slashes). A URL it accepts means the same
# thing to httpx, to curl and to the server.

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters allowed raw in a path: RFC 3986 pchar plus "/" (percent signs are checked separately).
_PATH_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/%"
)
# Escapes refused in a path: encoded "/", "\" and NUL let servers disagree about segments.
_FORBIDDEN_ESCAPES = frozenset({"2F", "5C", "00"})
_DEFAULT_HTTPS_PORT: Final = 443


@dataclass(frozen=True, slots=True)
class _Origin:
    host: str  # normalised: lowercase ASCII (IDNA), no trailing dot; IPv6 without brackets
    port: int
    wildcard: bool  # "*." prefix: any subdomain of host on a label boundary


@dataclass(frozen=True, slots=True)
class _ParsedUrl:
    origin: _Origin
    paths: tuple[str, ...]  # every normalised reading (see _normalize_path)
    has_query_or_fragment: bool


class _UrlRefused(Exception):
    """Internal: parsing stopped with a fixed reason."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.value)
        self.reason = reason


def _has_forbidden_char(text: str) -> bool:
    for ch in text:
        code = ord(ch)
        if code <= 0x20 or code == 0x7F or ch == "\\":
            return True
        if code >= 0x80 and (ch.isspace() or not ch.isprintable()):
            return True
    return False


def _normalize_dns_host(host: str, *, allow_wildcard: bool) -> tuple[str, bool]:
    wildcard = False
    if host.startswith("*."):
        if not allow_wildcard:
            raise _UrlRefused(Reason.MALFORMED_INPUT)
        wildcard = True
        host = host[2:]
    if host.endswith("."):
        host = host[:-1]
    if not host or "*" in host or "%" in host:
        raise _UrlRefused(Reason.MALFORMED_INPUT)
    if not host.isascii() or "xn--" in host.lower():
        # IDNA 2008 with UTS 46 mapping (full-width dots, case, compatibility forms), then back to
        # the ASCII form the DNS sees. Anything idna cannot encode is refused.
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            raise _UrlRefused(Reason.MALFORMED_INPUT) from None
    host = host.lower()
    labels = host.split(".")
    if len(host) > 253 or any(_LABEL.fullmatch(label) is None for label in labels):
        raise _UrlRefused(Reason.MALFORMED_INPUT)
    last = labels[-1]
    if last.isdigit() or last.startswith("0x"):
        # WHATWG reads a numeric last label as IPv4 ("127.1", "0x7f.1", "2130706433"); accept
        # only the canonical dotted quad so that every parser agrees on the address.
        if wildcard:
            raise _UrlRefused(Reason.MALFORMED_INPUT)
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            raise _UrlRefused(Reason.MALFORMED_INPUT) from None
        if str(address) != host:
            raise _UrlRefused(Reason.MALFORMED_INPUT)
    elif wildcard and len(labels) < 2:
        # "*.co" would allow a whole top-level domain.
        raise _UrlRefused(Reason.MALFORMED_INPUT)
    return host, wildcard


def _parse_authority(authority: str, *, allow_wildcard: bool) -> _Origin:
    if "@" in authority:
        # Userinfo: "https://allowed.example@evil.net/" is the oldest confusion there is.
        raise _UrlRefused(Reason.SOURCE_NOT_ALLOWED)
    port_text: str | None = None
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise _UrlRefused(Reason.MALFORMED_INPUT)
        literal, rest = authority[1:end], authority[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise _UrlRefused(Reason.MALFORMED_INPUT)
            port_text = rest[1:]
        if "%" in literal or not literal:  # zone identifiers name a local interface
            raise _UrlRefused(Reason.MALFORMED_INPUT)
        try:
            host = ipaddress.IPv6Address(literal).compressed
        except ValueError:
            raise _UrlRefused(Reason.MALFORMED_INPUT) from None
        wildcard = False
    else:
        host_text, sep, port_part = authority.partition(":")
        if sep:
            port_text = port_part
        host, wildcard = _normalize_dns_host(host_text, allow_wildcard=allow_wildcard)
    port = _DEFAULT_HTTPS_PORT
    if port_text is not None:
        if _PORT.fullmatch(port_text) is None:
            raise _UrlRefused(Reason.MALFORMED_INPUT)
        port = int(port_text)
        if not 0 < port < 65536:
            raise _UrlRefused(Reason.MALFORMED_INPUT)
    return _Origin(host=host, port=port, wildcard=wildcard)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4, segment-wise: "." is dropped, ".." removes the previous segment
    and never climbs above the root."""
    segments = path.split("/")[1:]
    out: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                out.append("")
        elif segment == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)


def _normalize_path(raw: str) -> tuple[str, ...]:
    """Every reading of the path a server might make, normalised.

    Escapes of unreserved characters are decoded ("%41" is "A"), the rest uppercased; escapes
    that hide a separator are refused. Whether "%2e" is a dot differs between parsers (WHATWG and
    many servers say yes, httpx and others no), so both readings are returned and a URL must be
    allowed under each.
    """
    if not raw:
        return ("/",)
    if any(ch not in _PATH_CHARS for ch in raw):
        raise _UrlRefused(Reason.MALFORMED_INPUT)
    decoded_dots: list[str] = []
    literal_dots: list[str] = []
    pos = 0
    while pos < len(raw):
        ch = raw[pos]
        if ch != "%":
            decoded_dots.append(ch)
            literal_dots.append(ch)
            pos += 1
            continue
        match = _PCT.match(raw, pos)
        if match is None:
            raise _UrlRefused(Reason.MALFORMED_INPUT)
        hex_code = match.group(1).upper()
        if hex_code in _FORBIDDEN_ESCAPES:
            raise _UrlRefused(Reason.MALFORMED_INPUT)
        char = chr(int(hex_code, 16))
        decoded_dots.append(char if char in _UNRESERVED else "%" + hex_code)
        literal_dots.append(char if char in _UNRESERVED and char != "." else "%" + hex_code)
        pos += 3
    readings = {"".join(decoded_dots), "".join(literal_dots)}
    if any("//" in path for path in readings):
        # Empty segments: RFC 3986 keeps them, servers that merge slashes (nginx's default) drop
        # them, and "/a//.." then means "/a/" to one and "/" to the other. Refuse.
        raise _UrlRefused(Reason.MALFORMED_INPUT)
    return tuple(sorted({_remove_dot_segments(path) for path in readings}))


def _parse_https_url(url: object, *, allow_wildcard: bool) -> _ParsedUrl:
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise _UrlRefused(Reason.MALFORMED_INPUT)
    if _has_forbidden_char(url):
        raise _UrlRefused(Reason.MALFORMED_INPUT)
    scheme, sep, rest = url.partition(":")
    if not sep or _SCHEME.fullmatch(scheme) is None:
        raise _UrlRefused(Reason.MALFORMED_INPUT)
    if scheme.lower() != "https":
        raise _UrlRefused(Reason.SCHEME_NOT_ALLOWED)
    if not rest.startswith("//"):
        raise _UrlRefused(Reason.MALFORMED_INPUT)
    rest = rest[2:]
    cut = len(rest)
    for delimiter in "/?#":
        found = rest.find(delimiter)
        if 0 <= found < cut:
            cut = found
    authority, tail = rest[:cut], rest[cut:]
    if not authority:
        raise _UrlRefused(Reason.MALFORMED_INPUT)
    origin = _parse_authority(authority, allow_wildcard=allow_wildcard)
    path_end = len(tail)
    for delimiter in "?#":
        found = tail.find(delimiter)
        if 0 <= found < path_end:
            path_end = found
    paths = _normalize_path(tail[:path_end])
    return _ParsedUrl(origin=origin, paths=paths, has_query_or_fragment=path_end < len(tail))


def _parse_allowlist(allowed: object) -> tuple[_ParsedUrl, ...]:
    if not isinstance(allowed, list | tuple):
        raise _UrlRefused(Reason.MALFORMED_INPUT)
    if not allowed:
        raise _UrlRefused(Reason.SOURCE_NOT_ALLOWED)
    prefixes: list[_ParsedUrl] = []
    for entry in allowed:
        try:
            prefix = _parse_https_url(entry, allow_wildcard=True)
        except _UrlRefused:
            raise _UrlRefused(Reason.MALFORMED_INPUT) from None
        if prefix.has_query_or_fragment:
            raise _UrlRefused(Reason.MALFORMED_INPUT)
        prefixes.append(prefix)
    return tuple(prefixes)


def validate_allowlist(allowed_source_urls: object) -> Verdict:
    """Is this a non-empty list (or tuple) of valid https URL prefixes? Never raises."""
    try:
        _parse_allowlist(allowed_source_urls)
    except _UrlRefused as refused:
        return _deny(refused.reason)
    except Exception:  # noqa: BLE001 - fail closed on anything unforeseen
        return _deny(Reason.MALFORMED_INPUT)
    return _OK


def _host_matches(host: str, prefix: _Origin) -> bool:
    if prefix.wildcard:
        return host.endswith("." + prefix.host)
    return host == prefix.host


def _path_under(path: str, prefix_path: str) -> bool:
    if prefix_path.endswith("/"):
        return path.startswith(prefix_path)
    return path == prefix_path or path.startswith(prefix_path + "/")


def validate_source_url(url: object, allowed_source_urls: object) -> Verdict:
    """Is ``url`` an https URL under one of the allowlisted prefixes?

    Same host (case-insensitive, IDNA, trailing dot ignored; ``*.`` in a prefix allows subdomains on
    a label boundary), same port (443 when absent), and a path under the prefix's path on a segment
    boundary after resolving dot segments (percent-encoded ones included). Never raises.
    """
    try:
        parsed = _parse_https_url(url, allow_wildcard=False)
        prefixes = _parse_allowlist(allowed_source_urls)
    except _UrlRefused as refused:
        return _deny(refused.reason)
    except Exception:  # noqa: BLE001 - fail closed on anything unforeseen
        return _deny(Reason.MALFORMED_INPUT)
    for prefix in prefixes:
        if (
            _host_matches(parsed.origin.host, prefix.origin)
            and parsed.origin.port == prefix.origin.port
            and all(
                _path_under(path, prefix_path)
                for path in parsed.paths
                for prefix_path in prefix.paths
            )
        ):
            return _OK
    return _deny(Reason.SOURCE_NOT_ALLOWED)


# ----------------------------------------------------------------------------------------------
# integrity accumulator


class IntegrityAccumulator:
    """Hashes a model's bytes as they stream and judges them against the pinned spec.

    ``update`` returns a failing verdict the moment more bytes than declared have arrived, so the
    caller can cut the transfer off at once. ``finalize`` compares the sha256 in constant time.
    Once finalized, or once over the size, no further bytes can ever yield an ok verdict.
    """

    __slots__ = ("_expected_digest", "_expected_size", "_failed", "_finalized", "_hash", "_seen")

    def __init__(self, *, expected_digest: bytes, expected_size_bytes: int) -> None:
        self._expected_digest = expected_digest
        self._expected_size = expected_size_bytes
        self._hash = hashlib.sha256()
        self._seen = 0
        self._failed: Reason | None = None
        self._finalized = False

    @property
    def bytes_seen(self) -> int:
        """How many bytes were given to ``update`` (also those beyond the declared size)."""
        return self._seen

    @property
    def expected_size_bytes(self) -> int:
        return self._expected_size

    def update(self, chunk: bytes | bytearray | memoryview) -> Verdict:
        """Add ``chunk``; a failing verdict means stop reading now."""
        if isinstance(chunk, str) or not isinstance(chunk, bytes | bytearray | memoryview):
            raise TypeError("chunk must be bytes-like")
        view = memoryview(chunk).cast("B") if isinstance(chunk, memoryview) else chunk
        size = len(view)
        self._seen += size
        if self._finalized:
            self._failed = Reason.SIZE_MISMATCH
        if self._failed is not None:
            return _deny(self._failed)
        if self._seen > self._expected_size:
            self._failed = Reason.SIZE_MISMATCH
            return _deny(Reason.SIZE_MISMATCH)
        self._hash.update(view)
        return _OK

    def finalize(self) -> Verdict:
        """The verdict on everything seen: SIZE_MISMATCH, DIGEST_MISMATCH or ok."""
        self._finalized = True
        if self._failed is not None:
            return _deny(self._failed)
        if self._seen != self._expected_size:
            return _deny(Reason.SIZE_MISMATCH)
        # Constant time in the expected digest: compare_digest does not stop at the first
        # difference, and both operands are always 32 bytes.
        if not hmac.compare_digest(self._hash.digest(), self._expected_digest):
            return _deny(Reason.DIGEST_MISMATCH)
        return _OK


def create_integrity_accumulator(
    *,
    expected_digest: object,
    expected_size_bytes: object,
    source_url: object,
    allowed_source_urls: object,
) -> IntegrityAccumulator:
    """An accumulator for one model, after checking the spec and the source.

    Raises :class:`IntegritySpecError` (a ``TypeError`` and a ``ValueError``) with a fixed message
    when the spec is malformed or the source is not an allowed https URL.
    """
    spec = validate_integrity_spec(expected_digest, expected_size_bytes)
    if not spec.ok:
        raise IntegritySpecError(Reason(spec.reason))
    source = validate_source_url(source_url, allowed_source_urls)
    if not source.ok:
        raise IntegritySpecError(Reason(source.reason))
    digest = normalize_sha256(expected_digest)
    assert digest is not None  # checked by validate_integrity_spec
    assert isinstance(expected_size_bytes, int)
    return IntegrityAccumulator(
        expected_digest=bytes.fromhex(digest), expected_size_bytes=expected_size_bytes
    )


def verify_model_bytes(
    *,
    file_data: object,
    expected_digest: object,
    expected_size_bytes: object,
    source_url: object,
    allowed_source_urls: object,
) -> Verdict:
    """One-shot verification of bytes in memory. Never raises."""
    if isinstance(file_data, str) or not isinstance(file_data, bytes | bytearray | memoryview):
        return _deny(Reason.MALFORMED_INPUT)
    try:
        accumulator = create_integrity_accumulator(
            expected_digest=expected_digest,
            expected_size_bytes=expected_size_bytes,
            source_url=source_url,
            allowed_source_urls=allowed_source_urls,
        )
    except IntegritySpecError as refused:
        return _deny(refused.reason)
    accumulator.update(file_data)
    return accumulator.finalize()


# ----------------------------------------------------------------------------------------------
# lifecycle


class LifecycleState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"


class LifecycleEvent(StrEnum):
    START = "start"  # a verified model is being spawned
    HEALTH_OK = "health_ok"  # the child answered its readiness probe
    HEALTH_FAIL = "health_fail"  # start stalled, or too many probes failed in a row: give it up
    DRAIN = "drain"  # stop admitting; in-flight requests may finish
    STOPPED = "stopped"  # a drained child has been stopped
    CRASH = "crash"  # the child exited on its own
    ABORT = "abort"  # stop a child that never became ready (shutdown while starting)


_S = LifecycleState
_E = LifecycleEvent
_TRANSITIONS: Final[Mapping[tuple[LifecycleState, LifecycleEvent], LifecycleState]] = {
    (_S.STOPPED, _E.START): _S.STARTING,
    # The only way into READY.
    (_S.STARTING, _E.HEALTH_OK): _S.READY,
    (_S.STARTING, _E.HEALTH_FAIL): _S.STOPPED,
    (_S.STARTING, _E.CRASH): _S.STOPPED,
    (_S.STARTING, _E.ABORT): _S.STOPPED,
    (_S.READY, _E.HEALTH_OK): _S.READY,
    (_S.READY, _E.HEALTH_FAIL): _S.STOPPED,
    (_S.READY, _E.CRASH): _S.STOPPED,
    (_S.READY, _E.DRAIN): _S.DRAINING,
    (_S.DRAINING, _E.HEALTH_OK): _S.DRAINING,
    (_S.DRAINING, _E.HEALTH_FAIL): _S.STOPPED,
    (_S.DRAINING, _E.CRASH): _S.STOPPED,
    (_S.DRAINING, _E.STOPPED): _S.STOPPED,
}


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """Where the child is in its life. Change it only through :func:`transition_lifecycle`."""

    state: LifecycleState

    def __post_init__(self) -> None:
        if not isinstance(self.state, LifecycleState):
            raise TypeError("state must be a LifecycleState")


@dataclass(frozen=True, slots=True)
class TransitionResult:
    """``ok`` and ``reason`` as in a verdict; ``lifecycle`` is the new lifecycle when ok."""

    ok: bool
    reason: str
    lifecycle: Lifecycle | None


def create_lifecycle_state(state: LifecycleState = LifecycleState.STOPPED) -> Lifecycle:
    return Lifecycle(state=state)


def transition_lifecycle(lifecycle: object, event: object) -> TransitionResult:
    """The single source of truth for lifecycle changes. Never raises."""
    if not isinstance(lifecycle, Lifecycle) or not isinstance(event, LifecycleEvent):
        return TransitionResult(False, Reason.MALFORMED_INPUT, None)
    target = _TRANSITIONS.get((lifecycle.state, event))
    if target is None:
        return TransitionResult(False, Reason.INVALID_TRANSITION, None)
    result = lifecycle if target is lifecycle.state else Lifecycle(state=target)
    return TransitionResult(True, Reason.OK, result)


def can_serve_inference(lifecycle: object) -> bool:
    """True only in READY."""
    return isinstance(lifecycle, Lifecycle) and lifecycle.state is LifecycleState.READY


def _lifecycle_verdict(lifecycle: object) -> Verdict:
    if can_serve_inference(lifecycle):
        return _OK
    if isinstance(lifecycle, Lifecycle) and lifecycle.state is LifecycleState.DRAINING:
        return _deny(Reason.DRAINING)
    return _deny(Reason.NOT_READY)


# ----------------------------------------------------------------------------------------------
# restarts


def evaluate_restart(
    restart_times: object, now: object, *, max_restarts: object, window_s: object
) -> Verdict:
    """May the child be restarted once more? Denied (RESTART_LIMIT) when ``max_restarts``
    restarts already happened within the last ``window_s`` seconds, as OTP's restart intensity.
    Never raises; junk denies."""
    if not _is_number(now) or not _is_int(max_restarts) or not _is_number(window_s):
        return _deny(Reason.MALFORMED_INPUT)
    if not isinstance(restart_times, list | tuple) or not all(_is_number(t) for t in restart_times):
        return _deny(Reason.MALFORMED_INPUT)
    recent = sum(1 for t in restart_times if now - t < window_s)
    if recent >= max_restarts:  # type: ignore[operator]
        return _deny(Reason.RESTART_LIMIT)
    return _OK


def restart_backoff(failures: int, *, initial_s: float, max_s: float, jitter: float) -> float:
    """Seconds to wait before restart number ``failures`` (1, 2, ...) in a row.

    Exponential from ``initial_s``, capped at ``max_s``, with "equal jitter": the delay lies in
    [base/2, base] for ``jitter`` in [0, 1], so consecutive delays never shrink.
    """
    if failures < 1 or not all(math.isfinite(v) for v in (initial_s, max_s, jitter)):
        raise ValueError("failures must be >= 1 and the times finite")
    base = min(max_s, initial_s * 2.0 ** min(failures - 1, 62))
    return base * (0.5 + 0.5 * min(max(jitter, 0.0), 1.0))


# ----------------------------------------------------------------------------------------------
# admission


@dataclass(frozen=True, slots=True, kw_only=True)
class AdmissionState:
    """Counters of the admission gate: requests holding a slot, and requests waiting for one."""

    max_in_flight: int
    queue_bound: int
    in_flight: int = 0
    queued: int = 0

    def __post_init__(self) -> None:
        if not _is_int(self.max_in_flight) or self.max_in_flight < 1:
            raise ValueError("max_in_flight must be a positive int")
        if not _is_int(self.queue_bound) or self.queue_bound < 0:
            raise ValueError("queue_bound must be a non-negative int")
        if not _is_int(self.in_flight) or not 0 <= self.in_flight <= self.max_in_flight:
            raise ValueError("in_flight must be an int in 0..max_in_flight")
        if not _is_int(self.queued) or not 0 <= self.queued <= self.queue_bound:
            raise ValueError("queued must be an int in 0..queue_bound")


def create_admission_state(*, max_in_flight: int, queue_bound: int) -> AdmissionState:
    return AdmissionState(max_in_flight=max_in_flight, queue_bound=queue_bound)


def _with_counts(state: AdmissionState, in_flight: int, queued: int) -> AdmissionState:
    # The gateway's hot path: the bounds were checked by the caller, the limits are unchanged,
    # so the new state skips __post_init__'s re-validation of every field.
    new = object.__new__(AdmissionState)
    object.__setattr__(new, "max_in_flight", state.max_in_flight)
    object.__setattr__(new, "queue_bound", state.queue_bound)
    object.__setattr__(new, "in_flight", in_flight)
    object.__setattr__(new, "queued", queued)
    return new


def record_in_flight(state: AdmissionState) -> AdmissionState:
    """One more request holds a slot. Past ``max_in_flight`` this is a caller bug: ValueError."""
    if state.in_flight >= state.max_in_flight:
        raise ValueError("in_flight would exceed max_in_flight")
    return _with_counts(state, state.in_flight + 1, state.queued)


def record_released(state: AdmissionState) -> AdmissionState:
    """A request gave its slot back."""
    if state.in_flight <= 0:
        raise ValueError("no request in flight to release")
    return _with_counts(state, state.in_flight - 1, state.queued)


def record_queued(state: AdmissionState) -> AdmissionState:
    """One more request waits for a slot. Past ``queue_bound`` this is a caller bug: ValueError."""
    if state.queued >= state.queue_bound:
        raise ValueError("queued would exceed queue_bound")
    return _with_counts(state, state.in_flight, state.queued + 1)


def record_dequeued(state: AdmissionState) -> AdmissionState:
    """A waiting request left the queue (admitted, timed out or cancelled)."""
    if state.queued <= 0:
        raise ValueError("no request queued to dequeue")
    return _with_counts(state, state.in_flight, state.queued - 1)


def evaluate_admission(state: object) -> Verdict:
    """ok when a slot is free; AT_CAPACITY when the caller may wait; QUEUE_FULL when it may not."""
    if not isinstance(state, AdmissionState):
        return _deny(Reason.MALFORMED_INPUT)
    if state.in_flight < state.max_in_flight:
        return _OK
    if state.queued >= state.queue_bound:
        return _deny(Reason.QUEUE_FULL)
    return _deny(Reason.AT_CAPACITY)


# ----------------------------------------------------------------------------------------------
# resources


def _check_limit(value: object, name: str) -> None:
    if value is not None and (not _is_number(value) or value == 0):
        raise ValueError(f"{name} must be a positive finite number or None")


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceLimits:
    """Ceilings for the child: bytes of RAM and VRAM, percent of one CPU. None = not limited."""

    max_ram_bytes: int | float | None = None
    max_vram_bytes: int | float | None = None
    max_cpu_percent: int | float | None = None

    def __post_init__(self) -> None:
        _check_limit(self.max_ram_bytes, "max_ram_bytes")
        _check_limit(self.max_vram_bytes, "max_vram_bytes")
        _check_limit(self.max_cpu_percent, "max_cpu_percent")


@dataclass(frozen=True, slots=True)
class ResourceObservation:
    """One sample of what the child uses. None = not observed (no GPU, no reading)."""

    ram_bytes: int | float | None = None
    vram_bytes: int | float | None = None
    cpu_percent: int | float | None = None


def create_resource_limits(
    *,
    max_ram_bytes: int | float | None = None,
    max_vram_bytes: int | float | None = None,
    max_cpu_percent: int | float | None = None,
) -> ResourceLimits:
    return ResourceLimits(
        max_ram_bytes=max_ram_bytes,
        max_vram_bytes=max_vram_bytes,
        max_cpu_percent=max_cpu_percent,
    )


def _resource_verdict(observed: object, limit: object, over: Reason) -> Verdict:
    if limit is None:
        return _OK
    if not _is_number(limit) or limit == 0:
        return _deny(Reason.MALFORMED_INPUT)
    if observed is None:
        return _deny(Reason.RESOURCE_NOT_OBSERVED)
    if not _is_number(observed):
        return _deny(Reason.MALFORMED_INPUT)
    if observed > limit:  # type: ignore[operator]
        return _deny(over)
    return _OK


def evaluate_resource_limits(observation: object, limits: object) -> Verdict:
    """ok when every set limit is observed and not exceeded. RAM, then VRAM, then CPU."""
    if not isinstance(observation, ResourceObservation) or not isinstance(limits, ResourceLimits):
        return _deny(Reason.MALFORMED_INPUT)
    for observed, limit, over in (
        (observation.ram_bytes, limits.max_ram_bytes, Reason.RAM_OVER_LIMIT),
        (observation.vram_bytes, limits.max_vram_bytes, Reason.VRAM_OVER_LIMIT),
        (observation.cpu_percent, limits.max_cpu_percent, Reason.CPU_OVER_LIMIT),
    ):
        verdict = _resource_verdict(observed, limit, over)
        if not verdict.ok:
            return verdict
    return _OK


# ----------------------------------------------------------------------------------------------
# the whole request

_REQUEST_KEYS: Final = frozenset({"lifecycle", "admission", "observation", "limits"})


def evaluate_runtime_request(
    params: object = None,
    /,
    *,
    lifecycle: object = None,
    admission: object = None,
    observation: object = None,
    limits: object = None,
) -> Verdict:
    """May this inference request proceed? Lifecycle first, then resources, then admission.

    Takes the four parts as keywords, or (as the user's spec calls it) one mapping with those keys.
    Every part is required: a missing one denies. Never raises.
    """
    try:
        if params is not None:
            if not isinstance(params, Mapping) or not set(params) <= _REQUEST_KEYS:
                return _deny(Reason.MALFORMED_INPUT)
            if any(part is not None for part in (lifecycle, admission, observation, limits)):
                return _deny(Reason.MALFORMED_INPUT)
            lifecycle = params.get("lifecycle")
            admission = params.get("admission")
            observation = params.get("observation")
            limits = params.get("limits")
        verdict = _lifecycle_verdict(lifecycle)
        if not verdict.ok:
            return verdict
        verdict = evaluate_resource_limits(observation, limits)
        if not verdict.ok:
            return verdict
        return evaluate_admission(admission)
    except Exception:  # noqa: BLE001 - fail closed on anything unforeseen
        return _deny(Reason.MALFORMED_INPUT)
