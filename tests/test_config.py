"""Config: every key checked, errors name the key and never the value, defaults as documented."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import (
    Config,
    ConfigError,
    load_config,
    parse_config,
    render_config,
)
from supervisor.policy import Reason

ROOT = Path(__file__).resolve().parent.parent
DIGEST = "ab" * 32
SECRET_URL = "https://models.example.com/models/m.gguf?X-Amz-Signature=topsecret"


def base(**model: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "name": "m",
        "url": "https://models.example.com/models/m.gguf",
        "sha256": DIGEST,
        "size_bytes": 10,
        "allowed_sources": ["https://models.example.com/models/"],
    }
    section.update(model)
    return {"model": section}


def parse(data: dict[str, Any], base_dir: Path = Path("/etc/ls")) -> Config:
    return parse_config(data, base_dir)


def refused(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse(data)
    assert info.value.reason == Reason.INVALID_CONFIG
    return info.value.message


def test_defaults_are_the_documented_ones() -> None:
    config = parse(base())
    assert config.model.max_redirects == 5
    assert config.store.dir == Path("~/.cache/llama-supervisor").expanduser()
    assert config.backend.kind == "llama-server"
    assert config.backend.command == "llama-server"
    assert config.health.interval_s == 1.0
    assert config.health.timeout_s == 2.0
    assert config.health.failures_before_restart == 3
    assert config.health.start_timeout_s == 120.0
    assert config.restart.backoff_initial_s == 0.5
    assert config.restart.backoff_max_s == 30.0
    assert config.restart.max_restarts == 5
    assert config.restart.window_s == 60.0
    assert config.restart.stop_grace_s == 10.0
    assert config.admission.max_in_flight == 4
    assert config.admission.queue_bound == 64
    assert config.admission.queue_timeout_s == 30.0
    assert config.admission.drain_timeout_s == 30.0
    assert config.limits.max_ram_bytes == 0
    assert config.limits.drain_after_samples == 5
    assert config.gateway.host == "127.0.0.1"
    assert config.gateway.port == 8000
    assert config.gateway.tokens_env == "LLAMA_SUPERVISOR_TOKENS"
    assert config.gateway.max_body_bytes == 10485760


def test_digest_is_normalised_to_lowercase() -> None:
    assert parse(base(sha256=DIGEST.upper())).model.sha256 == DIGEST


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (base(sha256="zz"), "model.sha256: must be 64 hex characters"),
        (base(sha256=None), "model.sha256: is required"),
        (base(size_bytes=0), "model.size_bytes: must be an integer from 1 to 2 TiB"),
        (base(size_bytes="10"), "model.size_bytes: must be an integer from 1 to 2 TiB"),
        (base(name="a b/c"), "model.name: must be 1-128 characters"),
        (base(url=None), "model.url: is required"),
        (base(url="http://models.example.com/models/m.gguf"), "model.url: must be https:// or file:"),
        (base(url="https://evil.example/models/m.gguf"), "model.url: is not under model.allowed_sources"),
        (base(url="https://models.example.com/models/a b"), "model.url: is not a valid https URL"),
        (base(allowed_sources=[]), "model.allowed_sources: is required for an https source"),
        (base(allowed_sources=["http://x/"]), "model.allowed_sources: every entry must be an https URL prefix"),
        (base(allowed_sources="https://x/"), "model.allowed_sources: must be a list of strings"),
        (base(url="file://etc/m.gguf"), "model.url: write a local source as file:PATH"),
        (base(max_redirects=-1), "model.max_redirects: must be >= 0"),
        (base(max_redirects=True), "model.max_redirects: must be an integer"),
        (base(stall_timeout_s=0), "model.stall_timeout_s: must be > 0"),
        (base(stall_timeout_s=float("nan")), "model.stall_timeout_s: must be a finite number"),
        (base(tpyo=1), "model.tpyo: unknown key"),
        ({**base(), "extra": {}}, "extra: unknown section"),
        ({}, "model: section is required"),
        ({**base(), "admission": {"max_in_flight": 0}}, "admission.max_in_flight: must be >= 1"),
        ({**base(), "admission": {"queue_bound": -1}}, "admission.queue_bound: must be >= 0"),
        ({**base(), "health": {"failures_before_restart": 0}}, "health.failures_before_restart: must be >= 1"),
        ({**base(), "restart": {"backoff_initial_s": 5, "backoff_max_s": 1}}, "restart.backoff_max_s: must be >= restart.backoff_initial_s"),
        ({**base(), "gateway": {"port": 70000}}, "gateway.port: must be <= 65535"),
        ({**base(), "gateway": {"host": "example.com"}}, "gateway.host: must be an IP address or localhost"),
        ({**base(), "gateway": {"tokens_env": "not a name"}}, "gateway.tokens_env: must be an environment variable name"),
        ({**base(), "backend": {"kind": "ollama"}}, "backend.kind: must be llama-server or llama-cpp-python"),
        ({**base(), "backend": {"args": ["--port", "1"]}}, "backend.args: host, port, API key, alias and model belong"),
        ({**base(), "backend": {"args": ["--api-key=x"]}}, "backend.args: host, port, API key, alias and model belong"),
        ({**base(), "backend": {"args": ["-m", "other.gguf"]}}, "backend.args: host, port, API key, alias and model belong"),
        ({**base(), "backend": {"args": ["--hf-repo", "x/y"]}}, "backend.args: host, port, API key, alias and model belong"),
        ({**base(), "backend": {"kind": "llama-cpp-python", "args": ["--model_alias", "x"]}}, "backend.args: host, port, API key, alias and model belong"),
        ({**base(), "backend": {"env": {"LLAMA_ARG_PORT": "1"}}}, "backend.env: variables that set the child's model, address or key are reserved"),
        ({**base(), "backend": {"env": {"LLAMA_API_KEY": "1"}}}, "backend.env: variables that set the child's model, address or key are reserved"),
        ({**base(), "backend": {"env": {"A": 1}}}, "backend.env: must be a table of strings"),
        ({**base(), "model": "x"}, "model: must be a table"),
    ],
)  # fmt: skip
def test_errors_name_the_key_and_the_problem(data: dict[str, Any], message: str) -> None:
    assert refused(data).startswith(message)


@pytest.mark.parametrize(
    "data",
    [
        base(url=SECRET_URL.replace("models.example.com", "evil.example")),
        base(url=SECRET_URL.replace("https", "http")),
        base(url=SECRET_URL + " "),
        base(sha256="Z" + DIGEST[1:]),
        {**base(), "backend": {"env": {"LLAMA_API_KEY": "topsecret"}}},
    ],
)
def test_errors_never_echo_a_value(data: dict[str, Any]) -> None:
    message = refused(data)
    for secret in ("topsecret", "evil.example", "models.example.com", DIGEST[1:]):
        assert secret not in message


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    data = base(url="file:models/m.gguf", allowed_sources=[], ca_bundle="certs/ca.pem")
    data["store"] = {"dir": "store"}
    data["backend"] = {"command": "./bin/llama-server"}
    config = parse(data, tmp_path)
    assert config.model.url == f"file:{tmp_path / 'models/m.gguf'}"
    assert config.model.is_file_source
    assert config.model.ca_bundle == tmp_path / "certs/ca.pem"
    assert config.store.dir == tmp_path / "store"
    assert config.backend.command == str(tmp_path / "bin/llama-server")
    plain = parse({**base(), "backend": {"command": "llama-server"}}, tmp_path)
    assert plain.backend.command == "llama-server"  # looked up on PATH


def test_limits_zero_means_not_limited() -> None:
    config = parse({**base(), "limits": {"max_ram_bytes": 1000, "max_cpu_percent": 0}})
    limits = config.limits.resource_limits()
    assert limits.max_ram_bytes == 1000
    assert limits.max_cpu_percent is None
    assert limits.max_vram_bytes is None


def test_render_masks_secrets_and_round_trips(tmp_path: Path) -> None:
    data = base(url=SECRET_URL)
    data["backend"] = {"env": {"MY_VAR": "topsecret"}}
    config = parse(data, tmp_path)
    text = render_config(config)
    assert "topsecret" not in text
    assert DIGEST not in text
    assert "X-Amz-Signature" not in text
    reparsed = tomllib.loads(text)
    assert reparsed["gateway"]["port"] == 8000
    assert reparsed["backend"]["env"] == {"MY_VAR": "<redacted>"}


def test_load_config_errors_hold_no_path(tmp_path: Path) -> None:
    missing = tmp_path / "secret-dir" / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert "secret-dir" not in str(info.value)
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nname = "x\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config(path)
    assert config.model.name
