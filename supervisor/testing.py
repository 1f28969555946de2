"""A pytest plugin: a ready, supervised llama.cpp server for integration tests.

Installed with the package (entry point ``pytest11``), so any test suite can ask for the
``llama_supervisor`` fixture, a factory::

    def test_completion(llama_supervisor):
        server = llama_supervisor("config/demo.toml")
        response = server.client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        assert response.status_code == 200

The first call for a config fetches and verifies its model, spawns the child and waits until it is
ready; later calls in the same test session get the same server. Each server listens on a free
port (``gateway.port`` is replaced by 0) and, unless the test asks otherwise, keeps its store in a
session temporary folder. All of them are drained and stopped when the session ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from supervisor.config import Config, load_config
from supervisor.fetch import fetch_model
from supervisor.runtime import Service

__all__ = ["SupervisedServer", "llama_supervisor", "start_server"]


@dataclasses.dataclass
class SupervisedServer:
    """A running supervisor: its gateway URL, a client for it, and the service itself."""

    base_url: str
    client: httpx.Client
    service: Service
    _stop: Callable[[], None]

    @property
    def openai_base_url(self) -> str:
        """For ``openai.OpenAI(base_url=...)``."""
        return self.base_url + "/v1"

    def stop(self) -> None:
        """Drain and stop (idempotent)."""
        self._stop()


async def _run(service: Service, *, task_status: anyio.abc.TaskStatus[int]) -> None:
    await service.run(task_status=task_status)


def start_server(
    portal: BlockingPortal,
    config: Config,
    *,
    ready_timeout_s: float = 120.0,
    tokens: tuple[bytes, ...] | None = None,
) -> SupervisedServer:
    """Fetch and verify the model, start the service in the portal's event loop, wait ready.

    The portal's thread is the one that forks the child: it must outlive the server (the
    parent-death signal is tied to the forking thread).
    """
    config = dataclasses.replace(config, gateway=dataclasses.replace(config.gateway, port=0))
    model = portal.call(fetch_model, config.model, config.store.dir)
    service = Service(config, model, tokens=tokens)
    future, port = portal.start_task(_run, service)

    async def ready() -> None:
        with anyio.fail_after(ready_timeout_s):
            await service.supervisor.wait_ready()

    def stop() -> None:
        if not future.done():
            portal.call(service.request_shutdown)
            with contextlib.suppress(Exception):
                future.result(timeout=60)

    try:
        portal.call(ready)
    except BaseException:
        stop()
        raise
    base_url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base_url, trust_env=False, timeout=60)
    return SupervisedServer(base_url=base_url, client=client, service=service, _stop=stop)


@pytest.fixture(scope="session")
def llama_supervisor(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., SupervisedServer]]:
    """A factory: ``llama_supervisor(config_path_or_Config, store=None, tokens=None)``."""
    servers: dict[Any, SupervisedServer] = {}
    with start_blocking_portal() as portal:

        def factory(
            config: str | Path | Config,
            *,
            store: str | Path | None = None,
            tokens: tuple[bytes, ...] | None = None,
        ) -> SupervisedServer:
            key = (str(config) if not isinstance(config, Config) else id(config), str(store))
            if key in servers:
                return servers[key]
            loaded = config if isinstance(config, Config) else load_config(config)
            store_dir = Path(store) if store is not None else tmp_path_factory.mktemp("llama-store")
            loaded = dataclasses.replace(
                loaded, store=dataclasses.replace(loaded.store, dir=store_dir)
            )
            server = start_server(portal, loaded, tokens=tokens)
            servers[key] = server
            return server

        try:
            yield factory
        finally:
            for server in servers.values():
                server.client.close()
                server.stop()
