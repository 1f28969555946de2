"""The product surface: the README's demo command, serve's exit codes, `status`, the pytest
fixture, and what the logs may (not) contain."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
import structlog

from conftest import FAKE_SERVER, ROOT, TINY_MODEL
from supervisor.config import Config, load_config
from supervisor.logging import configure_logging, forget_secret, get_logger, register_secret
from supervisor.testing import SupervisedServer


def cli(*args: str, env: dict[str, str] | None = None) -> list[str]:
    return [sys.executable, "-m", "supervisor", *args]


def test_readme_demo_command_serves_a_completion(tmp_path: Path, llama_server_bin: str) -> None:
    """`make demo` runs `llama-supervisor serve --config config/demo.toml` with the built
    llama-server first on PATH; here with a temporary HOME (the demo's store is under ~) and
    any free port."""
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "PATH": f"{Path(llama_server_bin).parent}:{os.environ['PATH']}",
    }
    proc = subprocess.Popen(
        [
            *cli(
                "--log-format",
                "json",
                "serve",
                "--config",
                str(ROOT / "config" / "demo.toml"),
                "--port",
                "0",
            )
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(r"tiny-llama ready at (http://127\.0\.0\.1:\d+/v1)\n", line)
        assert match, line
        base = match.group(1)
        # The curl of the README, as httpx; then the openai SDK call of the README.
        response = httpx.post(
            base + "/completions", json={"prompt": "Hello", "max_tokens": 8}, trust_env=False
        )
        assert response.status_code == 200
        assert response.json()["choices"][0]["finish_reason"] in ("length", "stop")
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
        chat = client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "Hello"}], max_tokens=8
        )
        assert chat.choices[0].message.role == "assistant"
        client.close()
        assert (tmp_path / ".cache" / "llama-supervisor" / "blobs").is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert str(tmp_path) not in err


def test_serve_exits_4_when_the_child_cannot_be_kept_running(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    digest = __import__("hashlib").sha256(TINY_MODEL.read_bytes()).hexdigest()
    config.write_text(
        f'[model]\nname = "m"\nurl = "file:{TINY_MODEL}"\nsha256 = "{digest}"\n'
        f"size_bytes = {TINY_MODEL.stat().st_size}\n"
        f'[store]\ndir = "{tmp_path / "store"}"\n'
        f'[backend]\ncommand = "{FAKE_SERVER}"\nargs = ["--mode", "exit"]\n'
        f"[restart]\nmax_restarts = 1\nbackoff_initial_s = 0.01\nbackoff_max_s = 0.01\n"
        f"[gateway]\nport = 0\n"
    )
    result = subprocess.run(
        cli("serve", "--config", str(config)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 4
    assert result.stderr.strip().splitlines()[-1] == (
        "error: restart_limit: the model server kept failing; restarts exhausted"
    )


def demo_config(llama_server_bin: str) -> Config:
    """config/demo.toml with the built llama-server as its command."""
    config = load_config(ROOT / "config" / "demo.toml")
    return dataclasses.replace(
        config, backend=dataclasses.replace(config.backend, command=llama_server_bin)
    )


def test_status_command(
    llama_supervisor: Callable[..., SupervisedServer], llama_server_bin: str
) -> None:
    config = demo_config(llama_server_bin)
    server = llama_supervisor(config)
    result = subprocess.run(
        cli("status", "--url", server.openai_base_url),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "state      ready (restarts: 0)" in result.stdout
    assert "model      tiny-llama (sha256 17c49db1c87f...)" in result.stdout
    missing = subprocess.run(
        cli("status", "--url", "http://127.0.0.1:9/secret-path"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: network_error: the supervisor did not answer"


def test_the_pytest_fixture(
    llama_supervisor: Callable[..., SupervisedServer], llama_server_bin: str
) -> None:
    """The README's example test for suites that need a real llama.cpp behind a fixture."""
    config = demo_config(llama_server_bin)
    server = llama_supervisor(config)
    assert llama_supervisor(config) is server  # one server per config for the session
    response = server.client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
    assert response.status_code == 200
    assert response.json()["model"] == "tiny-llama"
    assert server.client.get("/readyz").json()["ready"] is True


# -- logs ------------------------------------------------------------------------------------------


def test_log_redaction_removes_tokens_keys_and_signed_urls() -> None:
    stream = io.StringIO()
    configure_logging(json=True, stream=stream)
    key = "sk-ls-SECRETKEYVALUE1234567890"
    register_secret(key)
    try:
        log = get_logger("test")
        log.info("child.output", line=f"server started with key {key}")
        log.info(
            "fetch.redirect",
            location="https://cas-bridge.xethub.hf.co/x/y?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA123",
        )
        log.info(
            "gateway.seen",
            authorization="Bearer client-token-xyz",
            api_key="k-123456",
            token="tok-abcdef",
        )
        log.info("free.text", note="header was Authorization: Bearer client-token-xyz")
        log.warning(
            "nested", details={"hf_token": "hf_abcdefgh", "urls": ["https://h.example/p?sig=qqq"]}
        )
    finally:
        forget_secret(key)
        structlog.reset_defaults()
    output = stream.getvalue()
    for secret in (
        key,
        "deadbeef",
        "AKIA123",
        "client-token-xyz",
        "k-123456",
        "tok-abcdef",
        "hf_abcdefgh",
        "sig=qqq",
    ):
        assert secret not in output, secret
    lines = [json.loads(line) for line in output.splitlines()]
    assert [line["event"] for line in lines] == [
        "child.output",
        "fetch.redirect",
        "gateway.seen",
        "free.text",
        "nested",
    ]
    assert lines[0]["line"] == "server started with key <redacted>"
    assert lines[1]["location"] == "https://cas-bridge.xethub.hf.co/x/y?<redacted>"
    assert all("timestamp" in line and "level" in line for line in lines)


def test_console_renderer_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    configure_logging(stream=stream)
    try:
        get_logger("test").info("lifecycle.transition", from_state="stopped", to_state="starting")
    finally:
        structlog.reset_defaults()
    text = stream.getvalue()
    assert "lifecycle.transition" in text
    assert not text.lstrip().startswith("{")


def test_rate_limiter_counts_what_it_holds_back() -> None:
    from supervisor.logging import EventRateLimiter

    now = [0.0]
    limiter = EventRateLimiter(1.0, clock=lambda: now[0])
    assert limiter.allow("queue_full") == 0
    assert limiter.allow("queue_full") is None
    assert limiter.allow("queue_full") is None
    assert limiter.allow("not_ready") == 0  # per key
    now[0] = 1.5
    assert limiter.allow("queue_full") == 2


@pytest.mark.parametrize("path", sorted((ROOT / "config").rglob("*.toml")), ids=lambda p: p.name)
def test_config_readme_documents_every_key(path: Path) -> None:
    readme = (ROOT / "config" / "README.md").read_text()
    config = load_config(path)
    for section in dataclasses.fields(config):
        for item in dataclasses.fields(getattr(config, section.name)):
            assert f"`{section.name}.{item.name}`" in readme, (
                f"{section.name}.{item.name} is undocumented"
            )


def test_kubernetes_manifest_carries_a_valid_config(tmp_path: Path) -> None:
    manifest = (ROOT / "config" / "k8s" / "llama-supervisor.yaml").read_text().splitlines()
    start = manifest.index("  config.toml: |") + 1
    block = []
    for line in manifest[start:]:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    path = tmp_path / "config.toml"
    path.write_text("\n".join(block))
    config = load_config(path)
    assert config.gateway.host == "0.0.0.0"
    probes = "\n".join(manifest)
    assert "path: /healthz" in probes
    assert "path: /readyz" in probes
    assert "preStop" in probes
