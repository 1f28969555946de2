"""Readiness and liveness probes of the child, read through its backend.

One probe is one HTTP GET on loopback with a timeout; the outcome says whether the child is
ready, still loading, or failing. The loops that turn outcomes into lifecycle events live in
:mod:`supervisor.runtime`; this module only asks and interprets.
"""

from __future__ import annotations

from typing import Final

import httpx

from supervisor.backends import Backend, ChildLaunch, ProbeOutcome

__all__ = [
    "FIRST_PROBE_DELAY_S",
    "probe_client",
    "probe_once",
    "starting_delays",
]

#: The first readiness probe comes this soon after the spawn (the tiny model is ready in ~10 ms;
#: llama-server answers 503 while loading, so probing early costs nothing).
FIRST_PROBE_DELAY_S: Final = 0.05


def probe_client(launch: ChildLaunch, timeout_s: float) -> httpx.AsyncClient:
    """A client for one child's probes: loopback only, no proxies or .netrc from the
    environment, one connection kept alive."""
    return httpx.AsyncClient(
        base_url=launch.base_url,
        timeout=httpx.Timeout(timeout_s),
        trust_env=False,
        limits=httpx.Limits(max_connections=2, max_keepalive_connections=1),
    )


async def probe_once(
    client: httpx.AsyncClient, backend: Backend, launch: ChildLaunch
) -> ProbeOutcome:
    """GET the backend's probe path once; never raises for network trouble."""
    headers = {"Authorization": f"Bearer {launch.api_key}"} if backend.probe_with_key else {}
    try:
        response = await client.get(backend.probe_path, headers=headers)
    except httpx.HTTPError:
        return ProbeOutcome.FAILED
    return backend.interpret(response.status_code)


def starting_delays(interval_s: float) -> list[float]:
    """Delays between readiness probes while starting: 50 ms, doubling, up to ``interval_s``."""
    delays = []
    delay = FIRST_PROBE_DELAY_S
    while delay < interval_s:
        delays.append(delay)
        delay *= 2
    delays.append(interval_s)
    return delays
