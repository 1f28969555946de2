"""Shared fixtures: the anyio backend, a trustme CA, loopback HTTPS servers, the tiny model."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from httpsd import LoopbackServer

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "config" / "models" / "tiny-llama.gguf"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_model_bytes() -> bytes:
    return TINY_MODEL.read_bytes()


@pytest.fixture(scope="session")
def tiny_model_sha256(tiny_model_bytes: bytes) -> str:
    return hashlib.sha256(tiny_model_bytes).hexdigest()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_pem(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def server_ssl_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture
def https_server(server_ssl_context: ssl.SSLContext) -> Iterator[LoopbackServer]:
    with LoopbackServer(server_ssl_context) as server:
        yield server


@pytest.fixture
def second_https_server(server_ssl_context: ssl.SSLContext) -> Iterator[LoopbackServer]:
    with LoopbackServer(server_ssl_context) as server:
        yield server


@pytest.fixture
def plain_http_server() -> Iterator[LoopbackServer]:
    with LoopbackServer(None) as server:
        yield server
