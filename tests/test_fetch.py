"""Verified fetch against a real HTTPS server on 127.0.0.1 (trustme certificates).

Every refusal asserts its reason, that nothing landed in blobs/, that the server saw no request it
should not have, and that no URL, digest or store path appears in the error or the captured logs.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from httpsd import Handler, LoopbackServer
from supervisor.config import ModelConfig
from supervisor.fetch import (
    FetchError,
    FetchProgress,
    ModelStore,
    VerifiedModel,
    fetch_model,
    open_verified,
    verify_model,
)
from supervisor.policy import Reason

pytestmark = pytest.mark.anyio


def make_model(
    url: str, data: bytes, ca_pem: Path | None, allowed: tuple[str, ...], **overrides: Any
) -> ModelConfig:
    fields: dict[str, Any] = {
        "name": "tiny-test",
        "url": url,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "allowed_sources": allowed,
        "ca_bundle": ca_pem,
        "max_redirects": 3,
        "retries": 3,
        "retry_backoff_initial_s": 0.01,
        "retry_backoff_max_s": 0.05,
        "connect_timeout_s": 5.0,
        "stall_timeout_s": 5.0,
    }
    fields.update(overrides)
    return ModelConfig(**fields)


@contextmanager
def no_leaks(secrets: list[str]) -> Iterator[list[MutableMapping[str, Any]]]:
    """Capture structlog events; afterwards none may contain any of ``secrets``."""
    with capture_logs() as logs:
        yield logs
    text = repr(logs)
    for secret in secrets:
        assert secret not in text, "a secret leaked into the logs"


def assert_refused(exc: FetchError, reason: Reason, store_dir: Path, secrets: list[str]) -> None:
    assert exc.reason == reason
    blobs = store_dir / "blobs"
    assert not blobs.exists() or list(blobs.iterdir()) == []
    message = str(exc)
    for secret in secrets:
        assert secret not in message, "a secret leaked into the error"


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


class Env:
    """One test's server, model bytes and config, with the secrets that must not leak."""

    def __init__(self, server: LoopbackServer, data: bytes, ca_pem: Path, store_dir: Path) -> None:
        self.server = server
        self.data = data
        self.ca_pem = ca_pem
        self.store_dir = store_dir
        self.allowed = (server.origin + "/models/",)

    def model(self, path: str = "/models/m.gguf", **overrides: Any) -> ModelConfig:
        return make_model(self.server.url(path), self.data, self.ca_pem, self.allowed, **overrides)

    @property
    def secrets(self) -> list[str]:
        return [
            self.server.origin,
            "127.0.0.1",
            hashlib.sha256(self.data).hexdigest(),
            str(self.store_dir),
            "/models/",
        ]

    async def refused(self, model: ModelConfig, reason: Reason) -> FetchError:
        with no_leaks(self.secrets), pytest.raises(FetchError) as info:
            await fetch_model(model, self.store_dir)
        assert_refused(info.value, reason, self.store_dir, self.secrets)
        return info.value


@pytest.fixture
def env(
    https_server: LoopbackServer, tiny_model_bytes: bytes, ca_pem: Path, store_dir: Path
) -> Env:
    return Env(https_server, tiny_model_bytes, ca_pem, store_dir)


# -- the good path -----------------------------------------------------------------------------


async def test_fetch_verifies_installs_and_reuses(env: Env) -> None:
    env.server.routes["/models/m.gguf"] = lambda h: h.serve(env.data)
    progress: list[FetchProgress] = []
    with no_leaks(env.secrets) as logs:
        model = await fetch_model(env.model(), env.store_dir, on_progress=progress.append)
    assert isinstance(model, VerifiedModel)
    assert model.path.read_bytes() == env.data
    assert model.path.name == "sha256-" + hashlib.sha256(env.data).hexdigest()
    assert oct(model.path.stat().st_mode & 0o777) == oct(0o444)
    assert not any((env.store_dir / "partial").iterdir())
    assert progress[-1].done_bytes == progress[-1].total_bytes == len(env.data)
    assert [e["event"] for e in logs][-1] == "fetch.verified"
    model.check()
    # Second call: the verification record matches, no request, no re-hash.
    again = await fetch_model(env.model(), env.store_dir)
    assert again.path == model.path
    assert env.server.log.count("/models/m.gguf") == 1
    assert open_verified(env.model(), env.store_dir).path == model.path


async def test_verified_model_cannot_be_made_outside_fetch(env: Env) -> None:
    with pytest.raises(TypeError):
        VerifiedModel(
            path=Path("x"),
            sha256="0" * 64,
            size_bytes=1,
            name="x",
            store=ModelStore(env.store_dir),
        )


async def test_relative_redirects_within_allowlist_are_followed(env: Env) -> None:
    server = env.server
    server.routes["/models/start"] = lambda h: h.redirect("/models/api/resolve-cache/m")
    server.routes["/models/api/resolve-cache/m"] = lambda h: h.redirect(
        server.url("/models/cdn/m.gguf?X-Amz-Signature=secretsig"), 307
    )
    server.routes["/models/cdn/m.gguf"] = lambda h: h.serve(env.data)
    with no_leaks([*env.secrets, "secretsig"]):
        model = await fetch_model(env.model("/models/start"), env.store_dir)
    assert model.path.read_bytes() == env.data
    assert [r.path for r in server.log.requests] == [
        "/models/start",
        "/models/api/resolve-cache/m",
        "/models/cdn/m.gguf",
    ]


async def test_file_source_goes_through_the_same_verification(env: Env, tmp_path: Path) -> None:
    local = tmp_path / "local.gguf"
    local.write_bytes(env.data)
    model = env.model()
    model = dataclasses.replace(model, url=f"file:{local}", allowed_sources=())
    verified = await fetch_model(model, env.store_dir)
    assert verified.path.read_bytes() == env.data
    assert verified.path != local
    local.write_bytes(env.data[:-1] + b"\x00")
    store2 = tmp_path / "store2"
    with pytest.raises(FetchError) as info:
        await fetch_model(model, store2)
    assert_refused(info.value, Reason.DIGEST_MISMATCH, store2, [str(local)])
    missing = dataclasses.replace(model, url=f"file:{tmp_path / 'missing.gguf'}")
    with pytest.raises(FetchError) as info:
        await fetch_model(missing, tmp_path / "store3")
    assert info.value.reason == Reason.MODEL_MISSING


# -- refused before any connection ---------------------------------------------------------------


async def test_plain_http_url_is_refused_before_any_request(
    env: Env, plain_http_server: LoopbackServer
) -> None:
    plain_http_server.routes["/models/m.gguf"] = lambda h: h.serve(env.data)
    model = make_model(plain_http_server.url("/models/m.gguf"), env.data, env.ca_pem, env.allowed)
    await env.refused(model, Reason.SCHEME_NOT_ALLOWED)
    assert plain_http_server.log.requests == []


async def test_disallowed_url_is_refused_before_any_request(env: Env) -> None:
    env.server.routes["/other/m.gguf"] = lambda h: h.serve(env.data)
    await env.refused(env.model("/other/m.gguf"), Reason.SOURCE_NOT_ALLOWED)
    await env.refused(env.model("/models/../other/m.gguf"), Reason.SOURCE_NOT_ALLOWED)
    assert env.server.log.requests == []


async def test_malformed_spec_is_refused_before_any_request(env: Env) -> None:
    env.server.routes["/models/m.gguf"] = lambda h: h.serve(env.data)
    await env.refused(env.model(sha256="z" * 64), Reason.MALFORMED_SPEC)
    await env.refused(env.model(size_bytes=0), Reason.MALFORMED_SPEC)
    assert env.server.log.requests == []


async def test_not_enough_disk_space_is_refused_before_any_request(env: Env) -> None:
    env.server.routes["/models/m.gguf"] = lambda h: h.serve(env.data)
    huge = env.model(size_bytes=2 * 1024**4)  # 2 TiB: more than this disk has
    await env.refused(huge, Reason.DISK_FULL)
    assert env.server.log.requests == []


# -- adversarial sources -------------------------------------------------------------------------


async def test_wrong_bytes_of_the_right_length(env: Env) -> None:
    wrong = bytes(b ^ 0xFF for b in env.data[:16]) + env.data[16:]
    env.server.routes["/models/m.gguf"] = lambda h: h.serve(wrong)
    await env.refused(env.model(), Reason.DIGEST_MISMATCH)
    assert not any((env.store_dir / "partial").iterdir())


async def test_one_extra_byte_with_honest_length_is_refused_unread(env: Env) -> None:
    env.server.routes["/models/m.gguf"] = lambda h: h.serve(env.data + b"!")
    await env.refused(env.model(), Reason.SIZE_MISMATCH)


async def test_one_extra_byte_without_length_is_cut_off(env: Env) -> None:
    env.server.routes["/models/m.gguf"] = lambda h: h.serve(env.data + b"!", content_length=None)
    await env.refused(env.model(), Reason.SIZE_MISMATCH)


async def test_a_gigabyte_of_extra_bytes_is_cut_off_early(env: Env) -> None:
    gib = 1024**3
    block = b"\x42" * (1024 * 1024)

    def endless(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        h.send_body(env.data)
        for _ in range(gib // len(block)):
            h.send_body(block)

    env.server.routes["/models/m.gguf"] = endless
    await env.refused(env.model(), Reason.SIZE_MISMATCH)
    # Give the server thread a moment to notice the closed connection, then count what it sent.
    for _ in range(100):
        time.sleep(0.02)
        sent_before = env.server.log.body_bytes_sent["/models/m.gguf"]
        time.sleep(0.02)
        if env.server.log.body_bytes_sent["/models/m.gguf"] == sent_before:
            break
    sent = env.server.log.body_bytes_sent["/models/m.gguf"]
    assert sent < 64 * 1024 * 1024, f"read far past the declared size: {sent} bytes"


async def test_truncated_body_with_honest_length(env: Env) -> None:
    env.server.routes["/models/m.gguf"] = lambda h: h.serve(env.data[:-100])
    await env.refused(env.model(), Reason.SIZE_MISMATCH)


async def test_lying_content_length(env: Env) -> None:
    env.server.routes["/models/m.gguf"] = lambda h: h.serve(
        env.data, content_length=len(env.data) + 1000
    )
    await env.refused(env.model(), Reason.SIZE_MISMATCH)


async def test_truncated_every_time_gives_up_with_network_error(env: Env) -> None:
    def truncated(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(env.data)))
        h.end_headers()
        h.send_body(env.data[:1000])
        h.drop()

    env.server.routes["/models/m.gguf"] = truncated
    model = env.model(retries=2)
    await env.refused(model, Reason.NETWORK_ERROR)
    assert env.server.log.count("/models/m.gguf") == 3  # first try + 2 retries
    # What arrived is kept for a later resume.
    assert (env.store_dir / "partial").exists()


async def test_redirect_to_a_foreign_host_is_never_contacted(
    env: Env, second_https_server: LoopbackServer
) -> None:
    second_https_server.routes["/models/m.gguf"] = lambda h: h.serve(env.data)
    env.server.routes["/models/m.gguf"] = lambda h: h.redirect(
        second_https_server.url("/models/m.gguf")
    )
    await env.refused(env.model(), Reason.SOURCE_NOT_ALLOWED)
    assert second_https_server.log.requests == []


async def test_redirect_to_http_is_never_contacted(
    env: Env, plain_http_server: LoopbackServer
) -> None:
    plain_http_server.routes["/models/m.gguf"] = lambda h: h.serve(env.data)
    env.server.routes["/models/m.gguf"] = lambda h: h.redirect(
        plain_http_server.url("/models/m.gguf")
    )
    await env.refused(env.model(), Reason.SCHEME_NOT_ALLOWED)
    assert plain_http_server.log.requests == []


async def test_redirect_outside_the_prefix_is_never_requested(env: Env) -> None:
    env.server.routes["/elsewhere/m.gguf"] = lambda h: h.serve(env.data)
    env.server.routes["/models/m.gguf"] = lambda h: h.redirect("../elsewhere/m.gguf")
    await env.refused(env.model(), Reason.SOURCE_NOT_ALLOWED)
    assert env.server.log.count("/elsewhere/m.gguf") == 0


async def test_redirect_loop(env: Env) -> None:
    env.server.routes["/models/m.gguf"] = lambda h: h.redirect("/models/m.gguf")
    await env.refused(env.model(max_redirects=3), Reason.TOO_MANY_REDIRECTS)
    assert env.server.log.count("/models/m.gguf") == 4


async def test_500_then_200_is_retried(env: Env) -> None:
    calls = {"n": 0}

    def flaky(h: Handler) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            h.status(500)
        else:
            h.serve(env.data)

    env.server.routes["/models/m.gguf"] = flaky
    with no_leaks(env.secrets) as logs:
        model = await fetch_model(env.model(), env.store_dir)
    assert model.path.read_bytes() == env.data
    retries = [e for e in logs if e["event"] == "fetch.retry"]
    assert [(e["reason"], e["attempt"]) for e in retries] == [("http_status", 1)]


async def test_429_honours_retry_after(env: Env) -> None:
    calls = {"n": 0}

    def limited(h: Handler) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            h.status(429, {"Retry-After": "1"})
        else:
            h.serve(env.data)

    env.server.routes["/models/m.gguf"] = limited
    with capture_logs() as logs:
        model = await fetch_model(env.model(), env.store_dir)
    assert model.path.read_bytes() == env.data
    retries = [e for e in logs if e["event"] == "fetch.retry"]
    assert len(retries) == 1
    assert retries[0]["delay_s"] == 1.0


async def test_other_4xx_is_final(env: Env) -> None:
    env.server.routes["/models/m.gguf"] = lambda h: h.status(404)
    await env.refused(env.model(), Reason.HTTP_STATUS)
    assert env.server.log.count("/models/m.gguf") == 1


async def test_range_ignored_restarts_from_zero(env: Env) -> None:
    half = len(env.data) // 2
    store = ModelStore(env.store_dir)
    store.ensure()
    store.partial_path(env.model().sha256).write_bytes(env.data[:half])
    env.server.routes["/models/m.gguf"] = lambda h: h.serve(env.data, honour_range=False)
    model = await fetch_model(env.model(), env.store_dir)
    assert model.path.read_bytes() == env.data
    requests = env.server.log.for_path("/models/m.gguf")
    assert requests[0].headers.get("range") == f"bytes={half}-"
    assert len(requests) == 1  # the 200 answer to the Range request is used from byte 0


async def test_partial_longer_than_declared_is_discarded(env: Env) -> None:
    store = ModelStore(env.store_dir)
    store.ensure()
    store.partial_path(env.model().sha256).write_bytes(env.data + b"junk")
    env.server.routes["/models/m.gguf"] = lambda h: h.serve(env.data)
    model = await fetch_model(env.model(), env.store_dir)
    assert model.path.read_bytes() == env.data
    assert "range" not in env.server.log.for_path("/models/m.gguf")[0].headers


async def test_resume_from_a_partial_of_another_version_restarts_from_zero(env: Env) -> None:
    half = len(env.data) // 2
    store = ModelStore(env.store_dir)
    store.ensure()
    store.partial_path(env.model().sha256).write_bytes(b"\x00" * half)  # stale, wrong bytes
    env.server.routes["/models/m.gguf"] = lambda h: h.serve(env.data)
    model = await fetch_model(env.model(), env.store_dir)
    assert model.path.read_bytes() == env.data
    ranges = [r.headers.get("range") for r in env.server.log.for_path("/models/m.gguf")]
    assert ranges == [f"bytes={half}-", None]


async def test_stall_mid_stream_is_retried_and_resumed(env: Env) -> None:
    half = len(env.data) // 2
    calls = {"n": 0}
    release = threading.Event()

    def stalling(h: Handler) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            h.send_response(200)
            h.send_header("Content-Length", str(len(env.data)))
            h.end_headers()
            h.send_body(env.data[:half])
            release.wait(10)  # stall: no byte for longer than stall_timeout_s
            h.drop()
        else:
            h.serve(env.data)

    env.server.routes["/models/m.gguf"] = stalling
    try:
        with capture_logs() as logs:
            model = await fetch_model(env.model(stall_timeout_s=0.3), env.store_dir)
    finally:
        release.set()
    assert model.path.read_bytes() == env.data
    assert [e["reason"] for e in logs if e["event"] == "fetch.retry"] == ["stalled"]
    second = env.server.log.for_path("/models/m.gguf")[1]
    assert second.headers.get("range") == f"bytes={half}-"


async def test_connection_dropped_mid_stream_then_resumed(env: Env) -> None:
    cut = 200_000
    calls = {"n": 0}

    def dropping(h: Handler) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            h.send_response(200)
            h.send_header("Content-Length", str(len(env.data)))
            h.end_headers()
            h.send_body(env.data[:cut])
            h.drop()
        else:
            h.serve(env.data)

    env.server.routes["/models/m.gguf"] = dropping
    model = await fetch_model(env.model(), env.store_dir)
    assert model.path.read_bytes() == env.data
    requests = env.server.log.for_path("/models/m.gguf")
    assert len(requests) == 2
    start = int(requests[1].headers["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= cut
    # Only the missing tail was sent the second time.
    assert env.server.log.body_bytes_sent["/models/m.gguf"] == cut + len(env.data) - start


async def test_cancellation_leaves_a_resumable_partial(env: Env) -> None:
    env.data = os.urandom(3 * 1024 * 1024 + 17)  # several write batches
    sent_first = 5 * 1024 * 1024 // 2
    started = threading.Event()
    release = threading.Event()

    def slow(h: Handler) -> None:
        if h.request_range_start() is None:
            h.send_response(200)
            h.send_header("Content-Length", str(len(env.data)))
            h.end_headers()
            h.send_body(env.data[:sent_first])
            started.set()
            release.wait(10)
            h.drop()
        else:
            h.serve(env.data)

    env.server.routes["/models/m.gguf"] = slow
    with anyio.move_on_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(fetch_model, env.model(), env.store_dir)
            while not started.is_set():
                await anyio.sleep(0.01)
            await anyio.sleep(0.3)
            tg.cancel_scope.cancel()
    release.set()
    # The cancelled worker thread keeps the store lock until it has left the partial file
    # consistent; take the lock as the next download would, then look.
    store = ModelStore(env.store_dir)
    lock_fd = os.open(store.lock_path(env.model().sha256), os.O_RDWR)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    os.close(lock_fd)
    partial = store.partial_path(env.model().sha256)
    kept = partial.stat().st_size
    assert 0 < kept <= sent_first
    assert partial.read_bytes() == env.data[:kept]  # a consistent prefix
    model = await fetch_model(env.model(), env.store_dir)
    assert model.path.read_bytes() == env.data
    assert env.server.log.for_path("/models/m.gguf")[-1].headers["range"] == f"bytes={kept}-"


async def test_untrusted_certificate_is_refused(env: Env, tmp_path: Path) -> None:
    env.server.routes["/models/m.gguf"] = lambda h: h.serve(env.data)
    await env.refused(env.model(ca_bundle=None), Reason.TLS_ERROR)


# -- the store -----------------------------------------------------------------------------------


async def test_blob_is_not_trusted_on_its_name(env: Env) -> None:
    env.server.routes["/models/m.gguf"] = lambda h: h.serve(env.data)
    model = await fetch_model(env.model(), env.store_dir)
    # Tamper with the installed blob, keeping its size; the record no longer matches.
    os.chmod(model.path, 0o644)
    model.path.write_bytes(b"\x00" * len(env.data))
    with pytest.raises(FetchError) as info:
        model.check()
    assert info.value.reason == Reason.STORE_ERROR
    with no_leaks(env.secrets) as logs:
        again = await fetch_model(env.model(), env.store_dir)
    assert again.path.read_bytes() == env.data
    events = [e["event"] for e in logs]
    assert "store.rehash" in events
    assert "store.quarantined" in events
    assert len(list((env.store_dir / "quarantine").iterdir())) == 1
    assert env.server.log.count("/models/m.gguf") == 2


async def test_blob_without_record_is_rehashed_and_trusted(env: Env) -> None:
    env.server.routes["/models/m.gguf"] = lambda h: h.serve(env.data)
    model = await fetch_model(env.model(), env.store_dir)
    os.unlink(ModelStore(env.store_dir).record_path(model.sha256))
    with pytest.raises(FetchError):
        open_verified(env.model(), env.store_dir)
    with capture_logs() as logs:
        again = await fetch_model(env.model(), env.store_dir)
    assert again.path == model.path
    assert "store.rehash" in [e["event"] for e in logs]
    assert env.server.log.count("/models/m.gguf") == 1


async def test_verify_rehashes_and_quarantines(env: Env) -> None:
    env.server.routes["/models/m.gguf"] = lambda h: h.serve(env.data)
    model = await fetch_model(env.model(), env.store_dir)
    assert (await verify_model(env.model(), env.store_dir)).path == model.path
    os.chmod(model.path, 0o644)
    with open(model.path, "r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff")
    with pytest.raises(FetchError) as info:
        await verify_model(env.model(), env.store_dir)
    assert_refused(info.value, Reason.DIGEST_MISMATCH, env.store_dir, env.secrets)
    with pytest.raises(FetchError) as info:
        await verify_model(env.model(), env.store_dir)
    assert info.value.reason == Reason.MODEL_MISSING


async def test_symlinked_blob_is_never_used(env: Env, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.gguf"
    elsewhere.write_bytes(env.data)
    store = ModelStore(env.store_dir)
    store.ensure()
    store.blob_path(env.model().sha256).symlink_to(elsewhere)
    env.server.routes["/models/m.gguf"] = lambda h: h.serve(env.data)
    model = await fetch_model(env.model(), env.store_dir)
    assert not model.path.is_symlink()
    assert env.server.log.count("/models/m.gguf") == 1


async def test_two_fetches_of_one_digest_share_one_download(env: Env) -> None:
    env.server.routes["/models/m.gguf"] = lambda h: h.serve(env.data, pause_s=0.02)
    results: list[VerifiedModel] = []

    async def one() -> None:
        results.append(await fetch_model(env.model(), env.store_dir))

    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            tg.start_soon(one)
    assert len(results) == 2
    assert results[0].path == results[1].path
    assert env.server.log.count("/models/m.gguf") == 1
    assert "fetch.shared" in [e["event"] for e in logs]
