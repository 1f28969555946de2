"""TOML configuration -> frozen dataclasses, every field checked.

The keys are a public contract (shared/CONFIG.md, documented in config/README.md). Unknown keys
are an error, so a typo never falls back to a default silently. Errors name the key and the
problem (``model.sha256: must be 64 hex characters``) and never echo a value: a value may be a
URL with a signed query, a path or a secret. Relative paths are relative to the config file's
folder.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

from supervisor.errors import SupervisorError
from supervisor.logging import REDACTED, redact_text
from supervisor.policy import (
    Reason,
    ResourceLimits,
    normalize_sha256,
    validate_allowlist,
    validate_integrity_spec,
    validate_source_url,
)

__all__ = [
    "AdmissionConfig",
    "BACKEND_KINDS",
    "BackendConfig",
    "Config",
    "ConfigError",
    "GatewayConfig",
    "HealthConfig",
    "LimitsConfig",
    "ModelConfig",
    "RestartConfig",
    "StoreConfig",
    "load_config",
    "parse_config",
    "render_config",
]

BackendKind = Literal["llama-server", "llama-cpp-python"]
BACKEND_KINDS: Final = ("llama-server", "llama-cpp-python")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+\-]{0,127}")


class ConfigError(SupervisorError):
    """The configuration is invalid. The message names the key, never its value."""

    default_reason = Reason.INVALID_CONFIG


# ----------------------------------------------------------------------------------------------
# the sections


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    name: str
    url: str
    sha256: str
    size_bytes: int
    allowed_sources: tuple[str, ...] = ()
    ca_bundle: Path | None = None
    max_redirects: int = 5
    retries: int = 5
    retry_backoff_initial_s: float = 0.5
    retry_backoff_max_s: float = 30.0
    connect_timeout_s: float = 10.0
    stall_timeout_s: float = 30.0

    @property
    def is_file_source(self) -> bool:
        return self.url.startswith("file:")

    @property
    def short_digest(self) -> str:
        """The first 12 hex characters: enough to tell models apart in /status, no more."""
        return self.sha256[:12]


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreConfig:
    dir: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendConfig:
    kind: BackendKind = "llama-server"
    command: str = "llama-server"
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthConfig:
    interval_s: float = 1.0
    timeout_s: float = 2.0
    failures_before_restart: int = 3
    start_timeout_s: float = 120.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RestartConfig:
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    max_restarts: int = 5
    window_s: float = 60.0
    stop_grace_s: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AdmissionConfig:
    max_in_flight: int = 4
    queue_bound: int = 64
    queue_timeout_s: float = 30.0
    drain_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    max_ram_bytes: int = 0
    max_vram_bytes: int = 0
    max_cpu_percent: float = 0.0
    sample_interval_s: float = 1.0
    drain_after_samples: int = 5

    def resource_limits(self) -> ResourceLimits:
        """The policy's limits: 0 in the config means not limited (None)."""
        return ResourceLimits(
            max_ram_bytes=self.max_ram_bytes or None,
            max_vram_bytes=self.max_vram_bytes or None,
            max_cpu_percent=self.max_cpu_percent or None,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    tokens_env: str = "LLAMA_SUPERVISOR_TOKENS"
    max_body_bytes: int = 10 * 1024 * 1024
    upstream_timeout_s: float = 600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    model: ModelConfig
    store: StoreConfig
    backend: BackendConfig = field(default_factory=BackendConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    restart: RestartConfig = field(default_factory=RestartConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)


# ----------------------------------------------------------------------------------------------
# reading values


class _Section:
    """One TOML table being read: every key read is ticked off; what is left over is an error."""

    def __init__(self, name: str, table: object) -> None:
        if not isinstance(table, Mapping):
            raise ConfigError(f"{name}: must be a table")
        self.name = name
        self.table: Mapping[str, Any] = table
        self.seen: set[str] = set()

    def _err(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.name}.{key}: {problem}")

    def raw(self, key: str) -> object:
        self.seen.add(key)
        return self.table.get(key)

    def str_(self, key: str, default: str | None = None, *, required: bool = False) -> str:
        value = self.raw(key)
        if value is None:
            if required or default is None:
                raise self._err(key, "is required")
            return default
        if not isinstance(value, str) or not value:
            raise self._err(key, "must be a non-empty string")
        return value

    def int_(
        self, key: str, default: int | None = None, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        value = self.raw(key)
        if value is None:
            if default is None:
                raise self._err(key, "is required")
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._err(key, "must be an integer")
        if value < minimum:
            raise self._err(key, f"must be >= {minimum}")
        if maximum is not None and value > maximum:
            raise self._err(key, f"must be <= {maximum}")
        return value

    def float_(
        self, key: str, default: float, *, positive: bool = True, allow_zero: bool = False
    ) -> float:
        value = self.raw(key)
        if value is None:
            return default
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise self._err(key, "must be a finite number")
        if value < 0 or (value == 0 and positive and not allow_zero):
            raise self._err(key, "must be > 0" if not allow_zero else "must be >= 0")
        return float(value)

    def str_list(self, key: str) -> tuple[str, ...]:
        value = self.raw(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self._err(key, "must be a list of strings")
        return tuple(value)

    def str_map(self, key: str) -> Mapping[str, str]:
        value = self.raw(key)
        if value is None:
            return MappingProxyType({})
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise self._err(key, "must be a table of strings")
        return MappingProxyType(dict(value))

    def path(self, key: str, base_dir: Path, default: str | None = None) -> Path | None:
        value = self.raw(key)
        if value is None:
            value = default
        if value is None:
            return None
        if not isinstance(value, str) or not value or "\x00" in value:
            raise self._err(key, "must be a non-empty path")
        return _resolve_path(value, base_dir)

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            # Key names come from the user's file, but they are names, not values: safe to show,
            # and without them a typo cannot be found. Bounded and printable only.
            shown = unknown[0] if unknown[0].isprintable() and len(unknown[0]) <= 64 else "?"
            raise self._err(shown, "unknown key")


def _resolve_path(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path)


# ----------------------------------------------------------------------------------------------
# sections


def _model(section: _Section, base_dir: Path) -> ModelConfig:
    name = section.str_("name", required=True)
    if _MODEL_NAME.fullmatch(name) is None:
        raise ConfigError(
            "model.name: must be 1-128 characters of letters, digits and . _ : + - "
            "(it is the only model identity that is logged)"
        )
    url = section.str_("url", required=True)
    sha256 = section.raw("sha256")
    size_bytes = section.raw("size_bytes")
    if sha256 is None:
        raise ConfigError("model.sha256: is required")
    if normalize_sha256(sha256) is None:
        raise ConfigError("model.sha256: must be 64 hex characters")
    if size_bytes is None:
        raise ConfigError("model.size_bytes: is required")
    if not validate_integrity_spec(sha256, size_bytes).ok:
        raise ConfigError("model.size_bytes: must be an integer from 1 to 2 TiB")
    allowed = section.str_list("allowed_sources")
    if url.startswith("file:"):
        local = url[len("file:") :]
        if local.startswith("//"):
            raise ConfigError("model.url: write a local source as file:PATH (no file://)")
        if not local or "\x00" in local:
            raise ConfigError("model.url: file: source needs a path")
        url = "file:" + str(_resolve_path(local, base_dir))
    else:
        if not allowed:
            raise ConfigError("model.allowed_sources: is required for an https source")
        if not validate_allowlist(list(allowed)).ok:
            raise ConfigError("model.allowed_sources: every entry must be an https URL prefix")
        verdict = validate_source_url(url, list(allowed))
        if verdict.reason == Reason.MALFORMED_INPUT:
            raise ConfigError("model.url: is not a valid https URL")
        if verdict.reason == Reason.SCHEME_NOT_ALLOWED:
            raise ConfigError("model.url: must be https:// or file:")
        if not verdict.ok:
            raise ConfigError("model.url: is not under model.allowed_sources")
    assert isinstance(sha256, str)
    assert isinstance(size_bytes, int)
    return ModelConfig(
        name=name,
        url=url,
        sha256=sha256.lower(),
        size_bytes=size_bytes,
        allowed_sources=allowed,
        ca_bundle=section.path("ca_bundle", base_dir),
        max_redirects=section.int_("max_redirects", 5, maximum=20),
        retries=section.int_("retries", 5, maximum=100),
        retry_backoff_initial_s=section.float_("retry_backoff_initial_s", 0.5),
        retry_backoff_max_s=section.float_("retry_backoff_max_s", 30.0),
        connect_timeout_s=section.float_("connect_timeout_s", 10.0),
        stall_timeout_s=section.float_("stall_timeout_s", 30.0),
    )


# Arguments that would take the model, the address or the key away from the supervisor.
_RESERVED_ARGS: Final[Mapping[str, frozenset[str]]] = {
    "llama-server": frozenset(
        {
            "-m", "--model", "-mu", "--model-url", "-hf", "-hfr", "--hf-repo", "-hff",
            "--hf-file", "-hfv", "-hfrv", "--hf-repo-v", "-hffv", "--hf-file-v", "-hft",
            "--hf-token", "-dr", "--docker-repo", "--host", "--port", "--api-key",
            "--api-key-file", "-a", "--alias", "--path", "--api-prefix", "--models-dir",
            "--models-preset", "--ssl-key-file", "--ssl-cert-file",
        }
    ),
    "llama-cpp-python": frozenset(
        {
            "--model", "--host", "--port", "--api_key", "--api-key", "--model_alias",
            "--model-alias", "--config_file", "--config-file", "--ssl_keyfile",
            "--ssl_certfile", "--hf_model_repo_id", "--hf-model-repo-id",
        }
    ),
}  # fmt: skip
_RESERVED_ENV_PREFIXES: Final = ("LLAMA_ARG_", "LLAMA_API_KEY", "HF_TOKEN", "CONFIG_FILE")


def _backend(section: _Section, base_dir: Path) -> BackendConfig:
    kind = section.str_("kind", "llama-server")
    if kind not in BACKEND_KINDS:
        raise ConfigError("backend.kind: must be llama-server or llama-cpp-python")
    default_command = "llama-server" if kind == "llama-server" else "python3"
    command = section.str_("command", default_command)
    if "/" in command or command.startswith("."):
        command = str(_resolve_path(command, base_dir))
    args = section.str_list("args")
    reserved = _RESERVED_ARGS[kind]
    for arg in args:
        if arg.split("=", 1)[0] in reserved:
            raise ConfigError(
                "backend.args: host, port, API key, alias and model belong to the supervisor"
            )
    env = section.str_map("env")
    for key in env:
        if _ENV_NAME.fullmatch(key) is None:
            raise ConfigError("backend.env: keys must be environment variable names")
        if key.upper().startswith(_RESERVED_ENV_PREFIXES):
            raise ConfigError(
                "backend.env: variables that set the child's model, address or key are reserved"
            )
    return BackendConfig(kind=kind, command=command, args=args, env=env)  # type: ignore[arg-type]


def _health(section: _Section) -> HealthConfig:
    return HealthConfig(
        interval_s=section.float_("interval_s", 1.0),
        timeout_s=section.float_("timeout_s", 2.0),
        failures_before_restart=section.int_("failures_before_restart", 3, minimum=1),
        start_timeout_s=section.float_("start_timeout_s", 120.0),
    )


def _restart(section: _Section) -> RestartConfig:
    config = RestartConfig(
        backoff_initial_s=section.float_("backoff_initial_s", 0.5, allow_zero=True),
        backoff_max_s=section.float_("backoff_max_s", 30.0, allow_zero=True),
        max_restarts=section.int_("max_restarts", 5),
        window_s=section.float_("window_s", 60.0),
        stop_grace_s=section.float_("stop_grace_s", 10.0, allow_zero=True),
    )
    if config.backoff_max_s < config.backoff_initial_s:
        raise ConfigError("restart.backoff_max_s: must be >= restart.backoff_initial_s")
    return config


def _admission(section: _Section) -> AdmissionConfig:
    return AdmissionConfig(
        max_in_flight=section.int_("max_in_flight", 4, minimum=1, maximum=100_000),
        queue_bound=section.int_("queue_bound", 64, maximum=1_000_000),
        queue_timeout_s=section.float_("queue_timeout_s", 30.0),
        drain_timeout_s=section.float_("drain_timeout_s", 30.0, allow_zero=True),
    )


def _limits(section: _Section) -> LimitsConfig:
    return LimitsConfig(
        max_ram_bytes=section.int_("max_ram_bytes", 0),
        max_vram_bytes=section.int_("max_vram_bytes", 0),
        max_cpu_percent=section.float_("max_cpu_percent", 0.0, allow_zero=True),
        sample_interval_s=section.float_("sample_interval_s", 1.0),
        drain_after_samples=section.int_("drain_after_samples", 5, minimum=1),
    )


def _gateway(section: _Section) -> GatewayConfig:
    host = section.str_("host", "127.0.0.1")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError("gateway.host: must be an IP address or localhost") from None
    tokens_env = section.str_("tokens_env", "LLAMA_SUPERVISOR_TOKENS")
    if _ENV_NAME.fullmatch(tokens_env) is None:
        raise ConfigError("gateway.tokens_env: must be an environment variable name")
    return GatewayConfig(
        host=host,
        port=section.int_("port", 8000, maximum=65535),
        tokens_env=tokens_env,
        max_body_bytes=section.int_("max_body_bytes", 10 * 1024 * 1024, minimum=1),
        upstream_timeout_s=section.float_("upstream_timeout_s", 600.0),
    )


_SECTIONS: Final = (
    "model",
    "store",
    "backend",
    "health",
    "restart",
    "admission",
    "limits",
    "gateway",
)


def parse_config(data: Mapping[str, object], base_dir: Path) -> Config:
    """Check a parsed TOML document; relative paths resolve against ``base_dir``."""
    for key in data:
        if key not in _SECTIONS:
            shown = key if key.isprintable() and len(key) <= 64 else "?"
            raise ConfigError(f"{shown}: unknown section")
    if "model" not in data:
        raise ConfigError("model: section is required")

    def section(name: str) -> _Section:
        return _Section(name, data.get(name, {}))

    model_s = section("model")
    model = _model(model_s, base_dir)
    model_s.finish()

    store_s = section("store")
    store_dir = store_s.path("dir", base_dir, default="~/.cache/llama-supervisor")
    assert store_dir is not None
    store_s.finish()

    parts: dict[str, Any] = {}
    for name, build in (
        ("health", _health),
        ("restart", _restart),
        ("admission", _admission),
        ("limits", _limits),
        ("gateway", _gateway),
    ):
        sec = section(name)
        parts[name] = build(sec)
        sec.finish()
    backend_s = section("backend")
    backend = _backend(backend_s, base_dir)
    backend_s.finish()
    return Config(model=model, store=StoreConfig(dir=store_dir), backend=backend, **parts)


def load_config(path: str | Path) -> Config:
    """Read and check a TOML config file."""
    config_path = Path(path).expanduser()
    try:
        raw = config_path.read_bytes()
    except OSError:
        raise ConfigError("config: cannot read the file") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        raise ConfigError("config: not valid TOML") from None
    return parse_config(data, config_path.resolve().parent)


# ----------------------------------------------------------------------------------------------
# rendering (check-config)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    if value is None:
        return '""'
    raise TypeError("unexpected config value type")


def render_config(config: Config) -> str:
    """The effective config as TOML, with every default filled in and secrets masked.

    Masked: the query string of the model URL (signed URLs carry a credential there), the
    values of ``backend.env``, and the digest (shortened). Token values are never part of the
    config: only the name of the environment variable that holds them.
    """
    lines: list[str] = []
    for section_name in _SECTIONS:
        section = getattr(config, section_name)
        lines.append(f"[{section_name}]")
        for item in dataclasses.fields(section):
            value = getattr(section, item.name)
            if section_name == "model" and item.name == "url":
                value = redact_text(value)
            elif section_name == "model" and item.name == "sha256":
                value = value[:12] + "..."
            elif section_name == "backend" and item.name == "env":
                value = {key: REDACTED for key in value}
            elif value is None:
                continue
            lines.append(f"{item.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
