"""Shared fixtures: the anyio backend, a trustme CA, loopback HTTPS servers, the tiny model."""

from __future__ import annotations

import hashlib
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from httpsd import LoopbackServer
from supervisor.config import Config, parse_config

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


@pytest.fixture(scope="session")
def llama_server_bin() -> str:
    """llama.cpp's server, built offline by scripts/build-llama-server (cached after once).

    CI and `make test` pass LLAMA_SERVER_BIN; without it the build script is run, which takes
    about 6 minutes the first time on 2 cores and returns at once afterwards.
    """
    found = os.environ.get("LLAMA_SERVER_BIN")
    if found:
        return found
    result = subprocess.run(
        [str(ROOT / "scripts" / "build-llama-server")],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    return result.stdout.strip().splitlines()[-1]


FAKE_SERVER = ROOT / "tests" / "children" / "fake_server.py"


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    """A config serving the shipped tiny model through a file: source, fast timings."""
    data: dict[str, Any] = {
        "model": {
            "name": "tiny-llama",
            "url": f"file:{TINY_MODEL}",
            "sha256": hashlib.sha256(TINY_MODEL.read_bytes()).hexdigest(),
            "size_bytes": TINY_MODEL.stat().st_size,
        },
        "store": {"dir": str(tmp_path / "store")},
        "health": {"interval_s": 0.2, "timeout_s": 1.0, "start_timeout_s": 30.0},
        "restart": {"backoff_initial_s": 0.05, "backoff_max_s": 0.5, "stop_grace_s": 5.0},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return parse_config(data, tmp_path)
