"""Per server kind: the child's command line and environment, and how to read its readiness.

Two kinds:

* ``llama-server``, llama.cpp's own server: listens before the model is loaded and answers
  ``503`` on every route until ready; ``GET /health`` answers ``200 {"status":"ok"}`` when ready.
* ``llama-cpp-python`` (``python -m llama_cpp.server``): loads the model, then listens; it has no
  ``/health``, so ``GET /v1/models`` with the key answering 200 means ready.

The supervisor owns the model, the address and the key: the child listens on 127.0.0.1 on a port
chosen here, and requires a random per-spawn API key, passed in the environment (never on the
command line, where any local user could read it in the process list). The model is passed as a
relative path, ``<name>.gguf``, from a private run folder holding a link to the verified blob:
llama.cpp and llama-cpp-python put the model path into responses, and this way they can only
show the configured name.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Final

from supervisor.config import BackendConfig

__all__ = [
    "BASE_ENV_NAMES",
    "Backend",
    "ChildLaunch",
    "ProbeOutcome",
    "backend_for",
    "child_environment",
    "free_loopback_port",
    "new_api_key",
    "prepare_launch",
]

#: The supervisor's own environment variables the child inherits; nothing else is passed on
#: (tokens, cloud credentials and the like stay with the supervisor).
BASE_ENV_NAMES: Final = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "PYTHONPATH",
        "VIRTUAL_ENV",
        "LD_LIBRARY_PATH",
        "CUDA_VISIBLE_DEVICES",
        "HIP_VISIBLE_DEVICES",
        "ROCR_VISIBLE_DEVICES",
        "GPU_DEVICE_ORDINAL",
        "OMP_NUM_THREADS",
    }
)
_BASE_ENV_PREFIXES: Final = ("LC_", "GGML_")


class ProbeOutcome(Enum):
    READY = "ready"
    LOADING = "loading"  # answered, but not ready yet (llama-server's 503 "Loading model")
    FAILED = "failed"  # no answer, or an answer that means something is wrong


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildLaunch:
    """Everything needed to spawn one child; ``api_key`` is a secret (never log this object)."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str
    port: int
    api_key: str

    def __repr__(self) -> str:  # keep the key and the paths out of any accidental repr
        return f"ChildLaunch(port={self.port})"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True, slots=True)
class Backend:
    """One server kind."""

    kind: str
    probe_path: str
    probe_with_key: bool
    routes: frozenset[str]

    def argv(
        self, config: BackendConfig, *, model_file: str, model_name: str, port: int
    ) -> tuple[str, ...]:
        if self.kind == "llama-server":
            own = [
                config.command,
                "--model", model_file,
                "--host", "127.0.0.1",
                "--port", str(port),
                "--alias", model_name,
            ]  # fmt: skip
        else:
            own = [
                config.command, "-m", "llama_cpp.server",
                "--model", model_file,
                "--host", "127.0.0.1",
                "--port", str(port),
                "--model_alias", model_name,
            ]  # fmt: skip
            if not any(arg.split("=", 1)[0] == "--interrupt_requests" for arg in config.args):
                # Its default cuts a streaming request off when the next one arrives: behind an
                # admission gate that lets several through, that would lose answers.
                own += ["--interrupt_requests", "False"]
        return (*own, *config.args)

    def key_env(self, api_key: str) -> dict[str, str]:
        name = "LLAMA_API_KEY" if self.kind == "llama-server" else "API_KEY"
        return {name: api_key}

    def interpret(self, status: int) -> ProbeOutcome:
        if status == 200:
            return ProbeOutcome.READY
        if status == 503 and self.kind == "llama-server":
            return ProbeOutcome.LOADING
        return ProbeOutcome.FAILED


_LLAMA_SERVER: Final = Backend(
    kind="llama-server",
    probe_path="/health",
    probe_with_key=False,
    routes=frozenset(
        {
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/models",
            "/completion",
            "/tokenize",
            "/detokenize",
        }
    ),
)
_LLAMA_CPP_PYTHON: Final = Backend(
    kind="llama-cpp-python",
    probe_path="/v1/models",
    probe_with_key=True,
    routes=frozenset(
        {
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/models",
            "/extras/tokenize",
            "/extras/detokenize",
        }
    ),
)


def backend_for(kind: str) -> Backend:
    if kind == "llama-server":
        return _LLAMA_SERVER
    if kind == "llama-cpp-python":
        return _LLAMA_CPP_PYTHON
    raise ValueError("unknown backend kind")


def child_environment(
    parent: Mapping[str, str], extra: Mapping[str, str], key_env: Mapping[str, str]
) -> dict[str, str]:
    """The child's explicit environment: a short allowlist of the parent's, the config's
    ``backend.env``, and the per-spawn key."""
    env = {
        name: value
        for name, value in parent.items()
        if name in BASE_ENV_NAMES or name.startswith(_BASE_ENV_PREFIXES)
    }
    env.update(extra)
    env.update(key_env)
    return env


def new_api_key() -> str:
    return "sk-ls-" + secrets.token_urlsafe(32)


def free_loopback_port() -> int:
    """A port free on 127.0.0.1 right now. Another process may take it before the child binds;
    the child then fails to start and is restarted on a new port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def prepare_launch(
    backend: Backend,
    config: BackendConfig,
    *,
    run_dir: str,
    model_path: str,
    model_name: str,
    parent_env: Mapping[str, str] | None = None,
) -> ChildLaunch:
    """Link the verified blob into ``run_dir`` as ``<name>.gguf`` and build the launch."""
    model_file = f"{model_name}.gguf"
    os.symlink(model_path, os.path.join(run_dir, model_file))
    port = free_loopback_port()
    api_key = new_api_key()
    env = child_environment(
        os.environ if parent_env is None else parent_env, config.env, backend.key_env(api_key)
    )
    argv = backend.argv(config, model_file=model_file, model_name=model_name, port=port)
    return ChildLaunch(argv=argv, env=env, cwd=run_dir, port=port, api_key=api_key)
