"""The gateway with real clients (the official openai SDK, httpx, raw sockets) in front of a real
llama.cpp child, and a small stand-in child where llama.cpp cannot produce the case (slow
answers, a stream held open)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
from structlog.testing import capture_logs

from conftest import FAKE_SERVER, make_config
from supervisor.config import Config
from supervisor.fetch import fetch_model
from supervisor.gateway import load_tokens
from supervisor.policy import LifecycleState, Reason
from supervisor.runtime import Service

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def serving(
    config: Config, *, wait_ready: bool = True, **kwargs: Any
) -> AsyncIterator[tuple[Service, str]]:
    """A whole service (supervisor, gate, watchdog, gateway) on a free port, ready."""
    model = await fetch_model(config.model, config.store.dir)
    service = Service(config, model, **kwargs)
    async with anyio.create_task_group() as tg:
        port = await tg.start(service.run)
        try:
            if wait_ready:
                with anyio.fail_after(60):
                    await service.supervisor.wait_ready()
            yield service, f"http://127.0.0.1:{port}"
        finally:
            service.request_shutdown()


def llama_config(
    tmp_path: Path, binary: str, *, args: list[str] | None = None, **sections: dict[str, Any]
) -> Config:
    backend = {
        "kind": "llama-server",
        "command": binary,
        "args": args or ["--ctx-size", "512", "--threads", "1"],
    }
    return make_config(tmp_path, backend=backend, gateway={"port": 0}, **sections)


def fake_config(tmp_path: Path, *args: str, **sections: dict[str, Any]) -> Config:
    backend = {"kind": "llama-server", "command": str(FAKE_SERVER), "args": list(args)}
    gateway = {"port": 0, **sections.pop("gateway", {})}
    return make_config(tmp_path, backend=backend, gateway=gateway, **sections)


@contextlib.contextmanager
def socket_bound() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


async def exchange_raw(port: int, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes (or 10 s)."""
    received = b""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(data)
        with anyio.fail_after(10):
            while True:
                try:
                    received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return received


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "code"}
    return error


# -- a real client against a real child ------------------------------------------------------


async def test_openai_sdk_chat_completion_and_streaming(
    tmp_path: Path, llama_server_bin: str
) -> None:
    config = llama_config(tmp_path, llama_server_bin)
    async with (
        serving(config, tokens=load_tokens("client-token")) as (service, url),
        openai.AsyncOpenAI(base_url=url + "/v1", api_key="client-token", max_retries=0) as client,
        openai.AsyncOpenAI(base_url=url + "/v1", api_key="wrong-token", max_retries=0) as wrong,
    ):
        chat = await client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "hello"}], max_tokens=4
        )
        assert chat.model == "tiny-llama"
        assert chat.choices[0].message.role == "assistant"
        completion = await client.completions.create(
            model="tiny-llama", prompt="hello", max_tokens=4
        )
        assert completion.usage is not None
        assert 1 <= completion.usage.completion_tokens <= 4
        chunks = []
        stream = await client.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            stream=True,
        )
        async for chunk in stream:
            chunks.append(chunk)
        # Random weights may sample the end-of-text token early: at least a role and a finish.
        assert len(chunks) >= 2
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        models = await client.models.list()
        assert [m.id for m in models.data] == ["tiny-llama"]

        with pytest.raises(openai.AuthenticationError) as info:
            await wrong.completions.create(model="tiny-llama", prompt="hello", max_tokens=1)
        assert info.value.status_code == 401
        assert info.value.code == "unauthorized"
        assert service.gate.in_flight == 0


async def test_openai_sdk_embeddings(tmp_path: Path, llama_server_bin: str) -> None:
    config = llama_config(
        tmp_path,
        llama_server_bin,
        args=["--ctx-size", "512", "--threads", "1", "--embeddings", "--pooling", "mean"],
    )
    async with (
        serving(config) as (_service, url),
        openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client,
    ):
        result = await client.embeddings.create(model="tiny-llama", input="hello")
        assert len(result.data[0].embedding) == 64  # the tiny model's embedding width


async def test_bodies_pass_through_byte_exact(tmp_path: Path, llama_server_bin: str) -> None:
    config = llama_config(tmp_path, llama_server_bin)
    async with serving(config) as (service, url):
        upstream = service.supervisor.upstream
        assert upstream is not None
        payload = {"content": "Hello, wörld! 🦙 <tag> & \\u0000", "with_pieces": True}
        async with httpx.AsyncClient(trust_env=False) as client:
            direct = await client.post(
                upstream.base_url + "/tokenize",
                json=payload,
                headers={"Authorization": f"Bearer {upstream.api_key}"},
            )
            proxied = await client.post(url + "/tokenize", json=payload)
        assert direct.status_code == proxied.status_code == 200
        assert proxied.content == direct.content
        assert proxied.headers["content-type"] == direct.headers["content-type"]
        # The child's key never comes back to the client.
        assert upstream.api_key.encode() not in proxied.content
        assert upstream.api_key not in str(proxied.headers)


async def test_upstream_errors_pass_through_unchanged(
    tmp_path: Path, llama_server_bin: str
) -> None:
    config = llama_config(tmp_path, llama_server_bin)
    async with serving(config) as (_service, url), httpx.AsyncClient(trust_env=False) as client:
        response = await client.post(url + "/v1/embeddings", json={"input": "x"})  # no --embeddings
        assert response.status_code == 501
        assert response.json()["error"]["type"] == "not_supported_error"


# -- streaming is forwarded as it arrives ----------------------------------------------------


async def test_sse_chunks_are_forwarded_before_the_stream_ends(tmp_path: Path) -> None:
    flag = tmp_path / "release-the-rest"
    config = fake_config(tmp_path, "--mode", "stream-gated", "--flag", str(flag))
    async with serving(config) as (_service, url):
        async with (
            httpx.AsyncClient(trust_env=False) as client,
            client.stream("POST", url + "/v1/chat/completions", json={"stream": True}) as response,
        ):
            assert response.status_code == 200
            lines = response.aiter_lines()
            with anyio.fail_after(10):  # the child holds the rest back until the flag exists
                first = await anext(lines)
            assert first == 'data: {"first":true}'
            flag.touch()
            rest = [line async for line in lines if line]
        assert rest == ['data: {"second":true}', "data: [DONE]"]


# -- admission ---------------------------------------------------------------------------------


async def test_flood_is_bounded_and_refused_fast(tmp_path: Path) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
    delay = 2.0
    config = fake_config(
        tmp_path,
        "--mode", "slow", "--delay", str(delay),
        admission={"max_in_flight": 4, "queue_bound": 16, "queue_timeout_s": 30.0},
    )  # fmt: skip
    body = b'{"prompt":"x"}'
    async with serving(config) as (service, url):
        port = int(url.rsplit(":", 1)[1])
        request = (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        statuses: list[int] = []
        codes: list[str] = []
        refused_in: list[float] = []

        async def one() -> None:
            start = time.monotonic()
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(request)
                data = b""
                with anyio.fail_after(60):
                    while True:
                        try:
                            data += await stream.receive()
                        except anyio.EndOfStream:
                            break
            head, _, payload = data.partition(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            statuses.append(status)
            if status == 429:
                refused_in.append(time.monotonic() - start)
                codes.append(json.loads(payload)["error"]["code"])
                assert b"Retry-After: 1" in head

        async with anyio.create_task_group() as tg:
            for _ in range(2000):
                tg.start_soon(one)
        assert service.gate.peak_in_flight <= 4
        assert service.gate.peak_queued <= 16
        ok = statuses.count(200)
        assert 4 <= ok <= 20 + 4  # at most 20 held at once; a few more fit as the first finish
        assert statuses.count(429) == 2000 - ok
        assert set(codes) == {"queue_full"}
        # Refused at once, not after waiting for a slot (which frees only after `delay`).
        assert sorted(refused_in)[len(refused_in) // 2] < delay
        assert service.gate.in_flight == 0
        assert service.gate.queued == 0
        # Normal service afterwards.
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.post(url + "/v1/completions", content=body)
        assert response.status_code == 200
        assert service.gate.in_flight == 0


async def test_queue_timeout_is_429(tmp_path: Path) -> None:
    config = fake_config(
        tmp_path,
        "--mode", "slow", "--delay", "1.0",
        admission={"max_in_flight": 1, "queue_bound": 4, "queue_timeout_s": 0.2},
    )  # fmt: skip
    async with (
        serving(config) as (service, url),
        httpx.AsyncClient(trust_env=False, timeout=10) as client,
    ):
        results: list[httpx.Response] = []

        async def one() -> None:
            results.append(await client.post(url + "/v1/completions", content=b"{}"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            await anyio.sleep(0.1)
            tg.start_soon(one)
        timed_out = [r for r in results if r.status_code == 429]
        assert len(timed_out) == 1
        assert error_of(timed_out[0])["code"] == "queue_timeout"
        assert timed_out[0].headers["retry-after"] == "1"
        assert service.gate.queued == 0


async def test_client_disconnect_frees_its_slot_at_once(tmp_path: Path) -> None:
    config = fake_config(
        tmp_path, "--mode", "slow", "--delay", "5.0", admission={"max_in_flight": 1}
    )
    async with serving(config) as (service, url):
        port = int(url.rsplit(":", 1)[1])
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
            )
            with anyio.fail_after(5):
                while service.gate.in_flight == 0:
                    await anyio.sleep(0.01)
        # The client is gone: the slot is free long before the child would have answered.
        with anyio.fail_after(2):
            while service.gate.in_flight:
                await anyio.sleep(0.01)
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
            health = await client.get(url + "/readyz")
        assert health.status_code == 200


# -- refusals in the OpenAI shape ----------------------------------------------------------------


async def test_fixed_refusals(tmp_path: Path) -> None:
    config = fake_config(
        tmp_path, "--mode", "slow", "--delay", "0.01", gateway={"port": 0, "max_body_bytes": 1024}
    )
    async with serving(config, tokens=load_tokens("t1, t2")) as (_service, url):
        async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
            auth = {"Authorization": "Bearer t2"}
            cases = [
                (await client.get("/nowhere", headers=auth), 404, "not_found"),
                (
                    await client.post("/v1/completions", content=b"x" * 2048, headers=auth),
                    413,
                    "body_too_large",
                ),
                (await client.post("/v1/completions", content=b"{}"), 401, "unauthorized"),
                (
                    await client.post(
                        "/v1/completions", content=b"{}", headers={"Authorization": "Bearer t3"}
                    ),
                    401,
                    "unauthorized",
                ),
                (await client.head("/v1/completions", headers=auth), 405, None),
                (await client.post("/healthz"), 405, "method_not_allowed"),
                (await client.get("/status"), 401, "unauthorized"),
            ]
            for response, status, code in cases:
                assert response.status_code == status
                if code is not None:
                    error = error_of(response)
                    assert error["code"] == code
                    assert "t2" not in response.text
            assert cases[2][0].headers["www-authenticate"] == "Bearer"
            ok = await client.post("/v1/completions", content=b"{}", headers=auth)
            assert ok.status_code == 200
            status_page = await client.get("/status", headers=auth)
            assert status_page.status_code == 200
            doc = status_page.json()
            assert doc["state"] == "ready"
            assert doc["model"] == "tiny-llama"
            assert len(doc["sha256"]) == 12
        port = int(url.rsplit(":", 1)[1])
        big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n"
        data = await exchange_raw(port, big)
        assert data.startswith(b"HTTP/1.1 431 ")
        assert b'"headers_too_large"' in data
        data = await exchange_raw(port, b"NOT HTTP AT ALL\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 400 ")


async def test_not_ready_is_503_with_retry_after(tmp_path: Path) -> None:
    config = fake_config(tmp_path, "--mode", "silent", health={"start_timeout_s": 60.0})
    async with (
        serving(config, wait_ready=False) as (service, url),
        httpx.AsyncClient(base_url=url, trust_env=False) as client,
    ):
        assert service.supervisor.state is LifecycleState.STARTING
        response = await client.post("/v1/completions", content=b"{}")
        assert response.status_code == 503
        assert error_of(response)["code"] == "not_ready"
        assert response.headers["retry-after"] == "2"
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"ready": False, "state": "starting"}
        assert (await client.get("/healthz")).status_code == 200


async def test_own_routes_and_metrics(tmp_path: Path, llama_server_bin: str) -> None:
    config = llama_config(tmp_path, llama_server_bin)
    with capture_logs() as logs:
        async with (
            serving(config) as (_service, url),
            httpx.AsyncClient(base_url=url, trust_env=False) as client,
        ):
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            assert (await client.get("/readyz")).json() == {"ready": True, "state": "ready"}
            await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            await client.get("/nope")
            metrics = (await client.get("/metrics")).text
    assert 'llama_supervisor_requests_total{route="/v1/completions",status="200"} 1.0' in metrics
    assert 'llama_supervisor_refusals_total{reason="not_found"} 1.0' in metrics
    assert 'llama_supervisor_lifecycle_state{state="ready"} 1.0' in metrics
    assert "llama_supervisor_upstream_latency_seconds_bucket" in metrics
    assert "llama_supervisor_in_flight 0.0" in metrics
    assert "llama_supervisor_restarts_total 0.0" in metrics
    assert "llama_supervisor_fetch_bytes_total" in metrics
    assert any(e["event"] == "gateway.refused" and e["reason"] == "not_found" for e in logs)


async def test_keep_alive_and_pipelined_requests(tmp_path: Path, llama_server_bin: str) -> None:
    config = llama_config(tmp_path, llama_server_bin)
    async with serving(config) as (_service, url):
        port = int(url.rsplit(":", 1)[1])
        body = b'{"prompt":"x","max_tokens":1}'
        one = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body),
            body,
        )
        data = await exchange_raw(
            port, one * 3 + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert data.count(b"HTTP/1.1 200 OK") == 4
        assert data.rstrip().endswith(b'{"status": "ok"}')


def test_tokens_are_compared_as_digests() -> None:
    from supervisor.gateway import _token_ok

    digests = load_tokens(" a-token ,b-token,")
    assert len(digests) == 2
    assert _token_ok(b"Bearer a-token", digests)
    assert _token_ok(b"bearer b-token", digests)
    assert not _token_ok(b"Bearer c-token", digests)
    assert not _token_ok(b"Basic a-token", digests)
    assert not _token_ok(None, digests)
    assert _token_ok(None, ())  # no tokens configured: no client auth
    assert Reason.UNAUTHORIZED.value == "unauthorized"


def test_error_body_holds_no_input() -> None:
    from supervisor.gateway import error_body

    for reason in Reason:
        body = json.loads(error_body(reason))
        assert body["error"]["code"] in {r.value for r in Reason}
        assert os.sep not in body["error"]["message"]


async def test_a_port_in_use_is_a_fixed_error(tmp_path: Path) -> None:
    from supervisor.gateway import GatewayError

    with socket_bound() as port:
        config = fake_config(tmp_path, "--mode", "slow", gateway={"port": port})
        model = await fetch_model(config.model, config.store.dir)
        service = Service(config, model)
        with pytest.raises(GatewayError) as info:
            await service.run()
    assert info.value.reason == Reason.LISTEN_FAILED
    assert str(port) not in str(info.value)
    assert service.supervisor.spawns == 0


async def test_drain_lets_in_flight_requests_finish_and_refuses_new_ones(tmp_path: Path) -> None:
    config = fake_config(tmp_path, "--mode", "slow", "--delay", "1.0")
    async with (
        serving(config) as (service, url),
        httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as client,
    ):
        results: dict[str, httpx.Response] = {}

        async def in_flight() -> None:
            results["in_flight"] = await client.post("/v1/completions", content=b"{}")

        async with anyio.create_task_group() as tg:
            tg.start_soon(in_flight)
            with anyio.fail_after(10):
                while service.gate.in_flight == 0:
                    await anyio.sleep(0.01)
            service.request_shutdown()
            with anyio.fail_after(10):
                while service.supervisor.state is not LifecycleState.DRAINING:
                    await anyio.sleep(0.01)
            results["new"] = await client.post("/v1/completions", content=b"{}")
        assert results["in_flight"].status_code == 200
        assert results["new"].status_code == 503
        assert error_of(results["new"])["code"] == "draining"


async def test_upstream_timeout_is_504(tmp_path: Path) -> None:
    config = fake_config(
        tmp_path, "--mode", "slow", "--delay", "5.0", gateway={"upstream_timeout_s": 0.5}
    )
    async with (
        serving(config) as (service, url),
        httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as client,
    ):
        response = await client.post("/v1/completions", content=b"{}")
        assert response.status_code == 504
        assert error_of(response)["code"] == "upstream_timeout"
        assert service.gate.in_flight == 0
