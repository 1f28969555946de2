"""llama-supervisor: a supervisor for the llama.cpp inference server.

The public API, re-exported here and loaded on first use (so that ``llama-supervisor fetch`` does
not pay for importing the gateway):

* configuration: :class:`Config`, :func:`load_config`, :class:`ConfigError`
* verified models: :func:`fetch_model`, :func:`verify_model`, :func:`open_verified`,
  :class:`VerifiedModel`, :class:`FetchError`
* running: :class:`Service` (supervisor, admission gate, watchdog and gateway in one task group),
  :class:`Supervisor`, :class:`ChildError`
* the decision vocabulary: :class:`Reason`, :class:`Verdict`, :class:`LifecycleState`,
  :class:`LifecycleEvent`, and the root :class:`SupervisorError`

The pure policy core is :mod:`supervisor.policy`; the pytest plugin is :mod:`supervisor.testing`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AdmissionGate": "supervisor.admission",
    "ChildError": "supervisor.runtime",
    "Config": "supervisor.config",
    "ConfigError": "supervisor.config",
    "FetchError": "supervisor.fetch",
    "LifecycleEvent": "supervisor.policy",
    "LifecycleState": "supervisor.policy",
    "Reason": "supervisor.policy",
    "Service": "supervisor.runtime",
    "Supervisor": "supervisor.runtime",
    "SupervisorError": "supervisor.errors",
    "Verdict": "supervisor.policy",
    "VerifiedModel": "supervisor.fetch",
    "Watchdog": "supervisor.watchdog",
    "fetch_model": "supervisor.fetch",
    "load_config": "supervisor.config",
    "open_verified": "supervisor.fetch",
    "verify_model": "supervisor.fetch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'supervisor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
