"""The model store and the verified download: the only way to get a :class:`VerifiedModel`.

Bytes are hashed while they stream, with the policy's integrity accumulator, and the transfer is
cut off the moment more bytes than declared arrive. Nothing is installed until the whole file is
on disk, fsynced and its sha256 matches; then it is renamed atomically into a content-addressed
store::

    <store>/blobs/sha256-<hex>       verified models, read-only
    <store>/records/sha256-<hex>.json  verification record: inode, device, mtime, size at install
    <store>/partial/sha256-<hex>     a download in progress (resumable)
    <store>/locks/sha256-<hex>.lock  one download per digest, across processes
    <store>/quarantine/              blobs that failed a check, moved aside, never used

A blob is never trusted on its name: at every start its size and verification record must match,
or it is re-hashed in full. Every redirect hop is checked against the allowlist before it is
requested. Errors are :class:`FetchError` with a fixed :class:`~supervisor.policy.Reason`; no
message or log line holds a URL, a store path or a digest: the model's configured name identifies
it.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import fcntl
import json
import os
import random
import shutil
import ssl
import stat
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Final, TypeVar

import anyio
import anyio.to_thread
import certifi
import httpx

from supervisor import __version__
from supervisor.config import ModelConfig
from supervisor.errors import SupervisorError
from supervisor.logging import get_logger
from supervisor.policy import (
    IntegrityAccumulator,
    Reason,
    Verdict,
    create_integrity_accumulator,
    normalize_sha256,
    validate_integrity_spec,
    validate_source_url,
)

__all__ = [
    "DISK_MARGIN_BYTES",
    "FetchError",
    "FetchProgress",
    "ModelStore",
    "VerifiedModel",
    "fetch_model",
    "open_verified",
    "verify_model",
]

#: Free space kept on top of the remaining bytes before a download starts.
DISK_MARGIN_BYTES: Final = 64 * 1024 * 1024
#: Bytes handed to the hashing/writing thread at a time: few thread hops, bounded memory.
_BATCH_BYTES: Final = 1024 * 1024
#: Batches in flight between the receiving task and the writing thread (memory bound).
_PIPELINE_DEPTH: Final = 4
#: How often progress is reported, at most.
_PROGRESS_INTERVAL_S: Final = 0.25
#: The longest Retry-After honoured.
_MAX_RETRY_AFTER_S: Final = 300.0
_READ_BYTES: Final = 1024 * 1024
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_RECORD_VERSION: Final = 1

_log = get_logger("fetch")
_T = TypeVar("_T")


class FetchError(SupervisorError):
    """A model could not be fetched or verified. ``reason`` says why; the message is fixed."""

    default_reason = Reason.NETWORK_ERROR


class _Retryable(Exception):
    """Internal: this attempt failed in a way another attempt may not."""

    def __init__(self, reason: Reason, retry_after: float | None = None) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.retry_after = retry_after


class _RestartFromZero(Exception):
    """Internal: the partial file cannot be resumed; start over at byte 0 (not an attempt)."""


@dataclass(frozen=True, slots=True)
class FetchProgress:
    """Where a download stands, for a progress bar or a log line."""

    done_bytes: int
    total_bytes: int
    rate_bytes_per_s: float


ProgressCallback = Callable[[FetchProgress], None]

_MINT: Final = object()


class VerifiedModel:
    """A model file whose bytes were proven to match the pinned sha256 and size.

    Made only by :func:`fetch_model`, :func:`verify_model` and :func:`open_verified`; the process
    code accepts nothing else and calls :meth:`check` again right before it spawns.
    """

    __slots__ = ("_store", "name", "path", "sha256", "size_bytes")

    def __init__(
        self,
        *,
        path: Path,
        sha256: str,
        size_bytes: int,
        name: str,
        store: ModelStore,
        _mint: object = None,
    ) -> None:
        if _mint is not _MINT:
            raise TypeError("a VerifiedModel is made only by supervisor.fetch")
        self.path = path
        self.sha256 = sha256
        self.size_bytes = size_bytes
        self.name = name
        self._store = store

    @property
    def short_digest(self) -> str:
        return self.sha256[:12]

    def check(self) -> None:
        """Raise :class:`FetchError` unless the blob still matches its verification record."""
        if not self._store.record_matches(self.sha256, self.size_bytes):
            raise FetchError(
                "the model changed on disk since it was verified", reason=Reason.STORE_ERROR
            )

    def __repr__(self) -> str:
        return (
            f"VerifiedModel(name={self.name!r}, sha256={self.short_digest}..., "
            f"size={self.size_bytes})"
        )


# ----------------------------------------------------------------------------------------------
# the store


class ModelStore:
    """The content-addressed folder of verified blobs (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.records = root / "records"
        self.partial = root / "partial"
        self.locks = root / "locks"
        self.quarantine_dir = root / "quarantine"

    def ensure(self) -> None:
        try:
            for folder in (self.blobs, self.records, self.partial, self.locks, self.quarantine_dir):
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise _store_error(exc) from None

    def blob_path(self, digest: str) -> Path:
        return self.blobs / f"sha256-{digest}"

    def record_path(self, digest: str) -> Path:
        return self.records / f"sha256-{digest}.json"

    def partial_path(self, digest: str) -> Path:
        return self.partial / f"sha256-{digest}"

    def lock_path(self, digest: str) -> Path:
        return self.locks / f"sha256-{digest}.lock"

    def _blob_stat(self, digest: str) -> os.stat_result | None:
        try:
            st = os.lstat(self.blob_path(digest))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _store_error(exc) from None
        return st

    def record_matches(self, digest: str, size: int) -> bool:
        """Does the blob exist as a regular file matching the record written at install?"""
        try:
            st = self._blob_stat(digest)
            record = json.loads(self.record_path(digest).read_text("utf-8"))
        except (OSError, ValueError, FetchError):
            return False
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return False
        return bool(record == _record(digest, st))

    def write_record(self, digest: str) -> None:
        st = self._blob_stat(digest)
        if st is None:
            raise FetchError(
                "the verified model vanished from the store", reason=Reason.STORE_ERROR
            )
        target = self.record_path(digest)
        tmp = target.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(_record(digest, st), sort_keys=True), "utf-8")
            os.replace(tmp, target)
            _fsync_dir(self.records)
        except OSError as exc:
            raise _store_error(exc) from None

    def quarantine(self, digest: str) -> None:
        """Move a blob that failed a check aside, with its record; it is never used again."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.blob_path(digest), self.quarantine_dir / f"sha256-{digest}.{stamp}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.record_path(digest))
        _fsync_dir(self.blobs)
        _log.warning("store.quarantined")

    def mint(self, model: ModelConfig) -> VerifiedModel:
        return VerifiedModel(
            path=self.blob_path(model.sha256),
            sha256=model.sha256,
            size_bytes=model.size_bytes,
            name=model.name,
            store=self,
            _mint=_MINT,
        )


def _record(digest: str, st: os.stat_result) -> dict[str, object]:
    return {
        "v": _RECORD_VERSION,
        "sha256": digest,
        "size": st.st_size,
        "ino": st.st_ino,
        "dev": st.st_dev,
        "mtime_ns": st.st_mtime_ns,
    }


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _store_error(exc: OSError) -> FetchError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return FetchError("not enough free disk space for the model", reason=Reason.DISK_FULL)
    return FetchError("the model store is not usable", reason=Reason.STORE_ERROR)


@contextlib.asynccontextmanager
async def _store_lock(store: ModelStore, digest: str, name: str) -> AsyncIterator[int]:
    """One download per digest across processes: flock, polled so that waiting is cancellable.

    Yields the lock's descriptor: a worker thread that must keep the lock past a cancellation
    holds a ``dup`` of it (the lock lives until every descriptor of it is closed).
    """
    try:
        fd = os.open(store.lock_path(digest), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise _store_error(exc) from None
    try:
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    _log.info("fetch.waiting_for_other_download", model=name)
                    waited = True
                await anyio.sleep(0.1)
        yield fd
    finally:
        os.close(fd)


async def _in_thread(lock_fd: int, work: Callable[[threading.Event], _T]) -> _T:
    """Run blocking ``work(stop)`` in a worker thread that holds the store lock while it runs.

    On cancellation the caller returns at once and sets ``stop``; the thread notices it at its
    next chunk (or its read timeout), leaves a consistent partial file, and only then lets the
    lock go, so no other download can touch the file while it still writes.
    """
    stop = threading.Event()
    held = os.dup(lock_fd)

    def run() -> _T:
        try:
            return work(stop)
        finally:
            os.close(held)

    try:
        return await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
    finally:
        stop.set()


class _Stopped(Exception):
    """Internal: the caller was cancelled; the worker thread stops at a chunk boundary."""


# ----------------------------------------------------------------------------------------------
# hashing and writing (in worker threads)


def _hash_file(
    path: Path, accumulator: IntegrityAccumulator, stop: threading.Event, limit: int | None = None
) -> None:
    with open(path, "rb", buffering=0) as handle:
        remaining = limit
        while remaining is None or remaining > 0:
            if stop.is_set():
                raise _Stopped
            want = _READ_BYTES if remaining is None else min(_READ_BYTES, remaining)
            block = handle.read(want)
            if not block:
                break
            accumulator.update(block)
            if remaining is not None:
                remaining -= len(block)


class _Writer:
    """Hashes and writes batches in order (runs in the pipeline's second thread).

    Each batch is gathered into one reused buffer, then hashed and written in one call: the
    per-call overheads of 16 KiB TLS records cost more than the copy, and a reused buffer costs
    no page faults (fresh pages are dear on a VM).
    """

    def __init__(self, fd: int, accumulator: IntegrityAccumulator) -> None:
        self.fd = fd
        self.accumulator = accumulator
        self.buffer = bytearray(_BATCH_BYTES + 256 * 1024)

    def __call__(self, chunks: list[bytes]) -> None:
        size = sum(len(chunk) for chunk in chunks)
        if size > len(self.buffer):
            self.buffer = bytearray(size)
        view = memoryview(self.buffer)
        at = 0
        for chunk in chunks:
            view[at : at + len(chunk)] = chunk
            at += len(chunk)
        block = view[:size]
        self.accumulator.update(block)
        while block:
            block = block[os.write(self.fd, block) :]


class _Progress:
    """Rate-limited progress reports (called from a worker thread)."""

    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self.total = total
        self.callback = callback
        self.started = time.monotonic()
        self.start_bytes = 0
        self.last = 0.0

    def begin(self, done: int) -> None:
        self.started = time.monotonic()
        self.start_bytes = done

    def report(self, done: int, *, force: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if not force and now - self.last < _PROGRESS_INTERVAL_S:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-6)
        self.callback(FetchProgress(done, self.total, (done - self.start_bytes) / elapsed))


# ----------------------------------------------------------------------------------------------
# HTTP


def _ssl_context(model: ModelConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certifi.where())
    if model.ca_bundle is not None:
        try:
            context.load_verify_locations(cafile=str(model.ca_bundle))
        except (OSError, ssl.SSLError):
            raise FetchError(
                "model.ca_bundle could not be loaded", reason=Reason.INVALID_CONFIG
            ) from None
    return context


def _client(model: ModelConfig, context: ssl.SSLContext) -> httpx.Client:
    # A blocking client in a worker thread: on loopback it streams at about twice the rate of
    # the async client, whose TLS runs through a Python-level memory BIO (scripts/bench_fetch.py).
    return httpx.Client(
        verify=context,
        timeout=httpx.Timeout(
            connect=model.connect_timeout_s,
            read=model.stall_timeout_s,  # no byte for this long: stalled
            write=model.connect_timeout_s,
            pool=model.connect_timeout_s,
        ),
        follow_redirects=False,  # every hop is checked against the allowlist first
        trust_env=False,  # no .netrc credentials or proxy settings leak into a model download
        headers={"User-Agent": f"llama-supervisor/{__version__}", "Accept-Encoding": "identity"},
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
    )


def _check_hop(url: str, allowed: tuple[str, ...]) -> None:
    """Refuse a hop unless both our parser and httpx's reading of it are allowed."""
    verdict = validate_source_url(url, list(allowed))
    if verdict.ok:
        try:
            verdict = validate_source_url(str(httpx.URL(url)), list(allowed))
        except (httpx.InvalidURL, ValueError):
            verdict = Verdict(False, Reason.SOURCE_NOT_ALLOWED)  # httpx cannot even parse it
    if not verdict.ok:
        reason = Reason(verdict.reason)
        if reason == Reason.MALFORMED_INPUT:
            reason = Reason.SOURCE_NOT_ALLOWED
        raise FetchError("the model source is not allowed", reason=reason)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), _MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, min(when.timestamp() - time.time(), _MAX_RETRY_AFTER_S))


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    """``bytes START-END/TOTAL`` -> (START, TOTAL or None for ``*``)."""
    if value is None or not value.startswith("bytes "):
        return None
    span, _, total = value[6:].partition("/")
    start, _, _end = span.partition("-")
    if not start.isdigit():
        return None
    return int(start), (int(total) if total.isdigit() else None)


def _is_tls_failure(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        current = current.__cause__ or current.__context__
    return False


_SIZE_DECLARED: Final = "the source declares another size"
_NOT_ALLOWED: Final = "the model source is not allowed"
_NO_MATCH: Final = "the model's bytes do not match the pinned digest and size"


# ----------------------------------------------------------------------------------------------
# one download (each attempt runs in a worker thread)


class _Download:
    """One model's download into the store's partial file."""

    def __init__(
        self, model: ModelConfig, store: ModelStore, progress: ProgressCallback | None
    ) -> None:
        self.model = model
        self.store = store
        self.partial = store.partial_path(model.sha256)
        self.progress = _Progress(model.size_bytes, progress)
        self.expected_digest = bytes.fromhex(model.sha256)
        self.ssl_context = None if model.is_file_source else _ssl_context(model)

    def _accumulator(self) -> IntegrityAccumulator:
        if self.model.is_file_source:
            return IntegrityAccumulator(
                expected_digest=self.expected_digest, expected_size_bytes=self.model.size_bytes
            )
        # The https form re-checks the spec and the configured source as it is made.
        return create_integrity_accumulator(
            expected_digest=self.model.sha256,
            expected_size_bytes=self.model.size_bytes,
            source_url=self.model.url,
            allowed_source_urls=list(self.model.allowed_sources),
        )

    def _open_partial(self) -> int:
        try:
            return os.open(
                self.partial, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise _store_error(exc) from None

    def _resume(self, fd: int, stop: threading.Event) -> tuple[int, IntegrityAccumulator]:
        """Re-hash what the partial file holds; discard it when it is longer than declared."""
        accumulator = self._accumulator()
        size = os.fstat(fd).st_size
        if size > self.model.size_bytes:
            os.ftruncate(fd, 0)
            size = 0
            _log.info("fetch.partial_discarded", model=self.model.name)
        if size:
            _hash_file(self.partial, accumulator, stop, size)
            _log.info("fetch.resume", model=self.model.name, offset=size)
        os.lseek(fd, size, os.SEEK_SET)
        return size, accumulator

    def _pump(
        self,
        chunks: Iterator[bytes],
        fd: int,
        offset: int,
        accumulator: IntegrityAccumulator,
        stop: threading.Event,
    ) -> None:
        """Stream ``chunks`` into the file and the hash.

        This thread receives; a second one hashes and writes, one batch behind, so sha256
        overlaps the transfer. At most ``_PIPELINE_DEPTH`` batches wait in between. Whatever
        ends the stream (a drop, a stall, a cancellation), what was received is a valid prefix
        and is written out before the error propagates; only bytes past the declared size are
        never written.
        """
        expected = self.model.size_bytes
        received = offset
        batch: list[bytes] = []
        batch_bytes = 0
        pending: deque[Future[None]] = deque()
        write = _Writer(fd, accumulator)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fetch-write") as executor:

            def submit() -> None:
                nonlocal batch, batch_bytes
                if len(pending) >= _PIPELINE_DEPTH:
                    pending.popleft().result()
                pending.append(executor.submit(write, batch))
                batch, batch_bytes = [], 0

            try:
                for chunk in chunks:
                    received += len(chunk)
                    if received > expected:
                        # More than declared: cut the transfer off now, write no more.
                        batch.clear()
                        raise FetchError(
                            "the source sent more bytes than declared",
                            reason=Reason.SIZE_MISMATCH,
                        )
                    batch.append(chunk)
                    batch_bytes += len(chunk)
                    if batch_bytes >= _BATCH_BYTES:
                        submit()
                    self.progress.report(received)
                    if stop.is_set():
                        raise _Stopped
            finally:
                if batch:
                    submit()
                while pending:
                    pending.popleft().result()

    def attempt_http(self, stop: threading.Event) -> None:
        fd = self._open_partial()
        try:
            offset, accumulator = self._resume(fd, stop)
            resumed = offset > 0
            if offset < self.model.size_bytes:
                assert self.ssl_context is not None
                with _client(self.model, self.ssl_context) as client:
                    accumulator, resumed = self._request(client, fd, offset, accumulator, stop)
            os.fsync(fd)
        except OSError as exc:
            raise _store_error(exc) from None
        finally:
            os.close(fd)
        self._judge(accumulator, resumed=resumed)

    def attempt_file(self, stop: threading.Event) -> None:
        source = Path(self.model.url[len("file:") :])
        fd = self._open_partial()
        try:
            os.ftruncate(fd, 0)
            accumulator = self._accumulator()
            try:
                handle = open(source, "rb", buffering=0)  # noqa: SIM115 - closed below
            except OSError:
                raise FetchError(
                    "the local model file cannot be read", reason=Reason.MODEL_MISSING
                ) from None
            with handle:
                self.progress.begin(0)
                self._pump(iter(partial(handle.read, _READ_BYTES), b""), fd, 0, accumulator, stop)
            os.fsync(fd)
        except OSError as exc:
            raise _store_error(exc) from None
        finally:
            os.close(fd)
        if accumulator.bytes_seen < self.model.size_bytes:
            raise FetchError(_NO_MATCH, reason=Reason.SIZE_MISMATCH)
        self._judge(accumulator, resumed=False)

    def _judge(self, accumulator: IntegrityAccumulator, *, resumed: bool) -> None:
        if accumulator.bytes_seen < self.model.size_bytes:
            raise _Retryable(Reason.NETWORK_ERROR)  # short: resume from what arrived
        verdict = accumulator.finalize()
        if verdict.ok:
            self.progress.report(self.model.size_bytes, force=True)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.partial)
        if verdict.reason == Reason.DIGEST_MISMATCH and resumed:
            # The bytes from before the interruption may belong to another version of the file.
            raise _RestartFromZero
        raise FetchError(_NO_MATCH, reason=Reason(verdict.reason))

    def _request(
        self,
        client: httpx.Client,
        fd: int,
        offset: int,
        accumulator: IntegrityAccumulator,
        stop: threading.Event,
    ) -> tuple[IntegrityAccumulator, bool]:
        """Follow checked redirects to the body and receive it; returns the accumulator that
        holds the file's hash and whether the file was resumed rather than started at byte 0."""
        url = self.model.url
        for hop in range(self.model.max_redirects + 1):
            _check_hop(url, self.model.allowed_sources)
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            try:
                request = client.build_request("GET", url, headers=headers)
            except httpx.InvalidURL:
                raise FetchError(_NOT_ALLOWED, reason=Reason.SOURCE_NOT_ALLOWED) from None
            with contextlib.closing(client.send(request, stream=True)) as response:
                if response.status_code in _REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise FetchError("a redirect without a location", reason=Reason.HTTP_STATUS)
                    try:
                        url = str(response.url.join(location))
                    except (httpx.InvalidURL, ValueError):
                        raise FetchError(_NOT_ALLOWED, reason=Reason.SOURCE_NOT_ALLOWED) from None
                    _log.info("fetch.redirect", model=self.model.name, hop=hop + 1)
                    continue
                return self._receive(response, fd, offset, accumulator, stop)
        raise FetchError("too many redirects", reason=Reason.TOO_MANY_REDIRECTS)

    def _receive(
        self,
        response: httpx.Response,
        fd: int,
        offset: int,
        accumulator: IntegrityAccumulator,
        stop: threading.Event,
    ) -> tuple[IntegrityAccumulator, bool]:
        status = response.status_code
        expected = self.model.size_bytes
        if status in (408, 429) or 500 <= status <= 599:
            raise _Retryable(Reason.HTTP_STATUS, _retry_after(response))
        if status == 416:
            raise _RestartFromZero
        if status == 200:
            if offset:
                # Range ignored: this response is the whole file, so start over at byte 0 with it.
                _log.info("fetch.range_ignored", model=self.model.name)
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                offset, accumulator = 0, self._accumulator()
            length = response.headers.get("content-length")
            if length is not None and length.strip() != str(expected):
                raise FetchError(_SIZE_DECLARED, reason=Reason.SIZE_MISMATCH)
        elif status == 206:
            content_range = _content_range(response.headers.get("content-range"))
            if content_range is None or content_range[0] != offset:
                raise _RestartFromZero
            if content_range[1] is not None and content_range[1] != expected:
                raise FetchError(_SIZE_DECLARED, reason=Reason.SIZE_MISMATCH)
            length = response.headers.get("content-length")
            if length is not None and length.strip() != str(expected - offset):
                raise FetchError(_SIZE_DECLARED, reason=Reason.SIZE_MISMATCH)
        else:
            raise FetchError(
                "the source answered with an unexpected status", reason=Reason.HTTP_STATUS
            )
        self.progress.begin(offset)
        self._pump(response.iter_raw(), fd, offset, accumulator, stop)
        return accumulator, offset > 0


def _attempt_http(download: _Download, stop: threading.Event) -> None:
    """One attempt, with httpx's errors mapped to ours at this boundary."""
    try:
        download.attempt_http(stop)
    except httpx.TimeoutException as exc:
        reason = Reason.STALLED if isinstance(exc, httpx.ReadTimeout) else Reason.NETWORK_ERROR
        raise _Retryable(reason) from None
    except httpx.TransportError as exc:
        if _is_tls_failure(exc):
            raise FetchError(
                "the source's TLS certificate was not trusted", reason=Reason.TLS_ERROR
            ) from None
        raise _Retryable(Reason.NETWORK_ERROR) from None


# ----------------------------------------------------------------------------------------------
# entry points


def _check_spec(model: ModelConfig) -> None:
    if not validate_integrity_spec(model.sha256, model.size_bytes).ok:
        raise FetchError("the model's sha256 or size is malformed", reason=Reason.MALFORMED_SPEC)
    if normalize_sha256(model.sha256) != model.sha256:
        raise FetchError("the model's sha256 is malformed", reason=Reason.MALFORMED_SPEC)
    if not model.is_file_source:
        _check_hop(model.url, model.allowed_sources)


def _backoff(attempt: int, model: ModelConfig) -> float:
    ceiling = min(model.retry_backoff_max_s, model.retry_backoff_initial_s * 2.0 ** (attempt - 1))
    return ceiling * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not cryptography


def _check_free_space(store: ModelStore, model: ModelConfig, margin: int) -> None:
    try:
        have = os.path.getsize(store.partial_path(model.sha256))
    except OSError:
        have = 0
    need = max(model.size_bytes - have, 0) + margin
    try:
        free = shutil.disk_usage(store.partial).free
    except OSError as exc:
        raise _store_error(exc) from None
    if free < need:
        raise FetchError("not enough free disk space for the model", reason=Reason.DISK_FULL)


async def _rehash_blob(store: ModelStore, model: ModelConfig, lock_fd: int) -> bool:
    accumulator = IntegrityAccumulator(
        expected_digest=bytes.fromhex(model.sha256), expected_size_bytes=model.size_bytes
    )
    blob = store.blob_path(model.sha256)
    try:
        await _in_thread(lock_fd, partial(_hash_file, blob, accumulator))
    except OSError:
        return False
    return accumulator.finalize().ok


async def _trusted_blob(
    store: ModelStore, model: ModelConfig, lock_fd: int
) -> VerifiedModel | None:
    """Under the lock: the blob when its record matches or a full re-hash proves it; else None
    (a blob that fails is quarantined)."""
    if store.record_matches(model.sha256, model.size_bytes):
        return store.mint(model)
    blob = store.blob_path(model.sha256)
    if not os.path.lexists(blob):
        return None
    _log.info("store.rehash", model=model.name)
    if stat.S_ISREG(os.lstat(blob).st_mode) and await _rehash_blob(store, model, lock_fd):
        store.write_record(model.sha256)
        return store.mint(model)
    store.quarantine(model.sha256)
    return None


def _install(store: ModelStore, model: ModelConfig) -> VerifiedModel:
    partial_file = store.partial_path(model.sha256)
    try:
        os.chmod(partial_file, 0o444)
        os.replace(partial_file, store.blob_path(model.sha256))
        _fsync_dir(store.blobs)
        _fsync_dir(store.partial)
    except OSError as exc:
        raise _store_error(exc) from None
    store.write_record(model.sha256)
    return store.mint(model)


async def fetch_model(
    model: ModelConfig,
    store_dir: Path,
    *,
    on_progress: ProgressCallback | None = None,
    disk_margin_bytes: int = DISK_MARGIN_BYTES,
) -> VerifiedModel:
    """Make sure the store holds the model's verified bytes; download them if needed.

    Raises :class:`FetchError` with a fixed reason. Cancellation at any point leaves a partial
    file that the next call resumes. ``on_progress`` is called from a worker thread, at most
    every quarter second.
    """
    _check_spec(model)
    store = ModelStore(store_dir)
    store.ensure()
    if store.record_matches(model.sha256, model.size_bytes):
        return store.mint(model)
    async with _store_lock(store, model.sha256, model.name) as lock_fd:
        # Another process may have installed it while we waited for the lock.
        verified = await _trusted_blob(store, model, lock_fd)
        if verified is not None:
            _log.info("fetch.shared", model=model.name)
            return verified
        _check_free_space(store, model, disk_margin_bytes)
        _log.info("fetch.start", model=model.name, size_bytes=model.size_bytes)
        download = _Download(model, store, on_progress)
        try:
            if model.is_file_source:
                await _in_thread(lock_fd, download.attempt_file)
            else:
                await _run_http(download, lock_fd)
        except FetchError as error:
            if error.reason in (Reason.SIZE_MISMATCH, Reason.DIGEST_MISMATCH):
                # The source misbehaves: nothing it sent is worth resuming from.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(download.partial)
            raise
        verified = _install(store, model)
    _log.info("fetch.verified", model=model.name, size_bytes=model.size_bytes)
    return verified


async def _run_http(download: _Download, lock_fd: int) -> None:
    model = download.model
    attempt = 0
    restarts = 0
    while True:
        try:
            await _in_thread(lock_fd, partial(_attempt_http, download))
            return
        except _RestartFromZero:
            restarts += 1
            if restarts > 2:
                raise FetchError(_NO_MATCH, reason=Reason.DIGEST_MISMATCH) from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(download.partial)
            _log.info("fetch.restart_from_zero", model=model.name)
        except _Retryable as exc:
            attempt += 1
            if attempt > model.retries:
                raise FetchError("the model could not be downloaded", reason=exc.reason) from None
            delay = exc.retry_after if exc.retry_after is not None else _backoff(attempt, model)
            _log.warning(
                "fetch.retry",
                model=model.name,
                attempt=attempt,
                reason=exc.reason.value,
                delay_s=round(delay, 3),
            )
            await anyio.sleep(delay)


async def verify_model(model: ModelConfig, store_dir: Path) -> VerifiedModel:
    """Re-hash the stored blob in full. A blob that fails is quarantined."""
    _check_spec(model)
    store = ModelStore(store_dir)
    store.ensure()
    blob = store.blob_path(model.sha256)
    async with _store_lock(store, model.sha256, model.name) as lock_fd:
        if not os.path.lexists(blob):
            raise FetchError("the model is not in the store", reason=Reason.MODEL_MISSING)
        if stat.S_ISREG(os.lstat(blob).st_mode) and await _rehash_blob(store, model, lock_fd):
            store.write_record(model.sha256)
            _log.info("store.verified", model=model.name)
            return store.mint(model)
        store.quarantine(model.sha256)
    raise FetchError(
        "the stored model does not match the pinned digest and size",
        reason=Reason.DIGEST_MISMATCH,
    )


def open_verified(model: ModelConfig, store_dir: Path) -> VerifiedModel:
    """The stored model when its verification record matches, without any network or re-hash."""
    _check_spec(model)
    store = ModelStore(store_dir)
    if not store.record_matches(model.sha256, model.size_bytes):
        raise FetchError("the model is not in the store", reason=Reason.MODEL_MISSING)
    return store.mint(model)
