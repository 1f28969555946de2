"""The command line, run as a real subprocess: fetch, verify, check-config and exit codes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from httpsd import Handler, LoopbackServer

ROOT = Path(__file__).resolve().parent.parent


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def write_config(
    path: Path,
    *,
    url: str,
    data: bytes,
    store: Path,
    ca_pem: Path | None,
    allowed: str,
    extra: str = "",
) -> Path:
    ca_line = f'ca_bundle = "{ca_pem}"' if ca_pem else ""
    path.write_text(
        f"""
[model]
name = "tiny-test"
url = "{url}"
sha256 = "{hashlib.sha256(data).hexdigest()}"
size_bytes = {len(data)}
allowed_sources = ["{allowed}"]
{ca_line}
retries = 2
retry_backoff_initial_s = 0.01
retry_backoff_max_s = 0.05
{extra}

[store]
dir = "{store}"
"""
    )
    return path


def assert_no_secret(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text


def test_fetch_then_verify(
    https_server: LoopbackServer, tiny_model_bytes: bytes, ca_pem: Path, tmp_path: Path
) -> None:
    https_server.routes["/models/m.gguf"] = lambda h: h.serve(tiny_model_bytes)
    store = tmp_path / "store"
    config = write_config(
        tmp_path / "c.toml",
        url=https_server.url("/models/m.gguf"),
        data=tiny_model_bytes,
        store=store,
        ca_pem=ca_pem,
        allowed=https_server.origin + "/models/",
    )
    result = run_cli("--log-format", "json", "fetch", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "tiny-test verified"
    assert "fetch: tiny-test: 100.0%" in result.stderr  # plain progress lines off a terminal
    secrets = [https_server.origin, hashlib.sha256(tiny_model_bytes).hexdigest(), str(store)]
    assert_no_secret(result.stdout + result.stderr, secrets)
    for line in result.stderr.splitlines():
        if line.startswith("{"):
            assert "event" in json.loads(line)  # JSON lines when stderr is not a terminal

    verify = run_cli("verify", "--config", str(config))
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.strip() == "tiny-test verified"

    blob = next((store / "blobs").iterdir())
    os.chmod(blob, 0o644)
    blob.write_bytes(b"\x00" * len(tiny_model_bytes))
    tampered = run_cli("verify", "--config", str(config))
    assert tampered.returncode == 3
    assert tampered.stderr.strip().splitlines()[-1] == (
        "error: digest_mismatch: the stored model does not match the pinned digest and size"
    )
    assert_no_secret(tampered.stderr, secrets)


def test_refusals_print_one_fixed_line_and_exit_3(
    https_server: LoopbackServer, tiny_model_bytes: bytes, ca_pem: Path, tmp_path: Path
) -> None:
    https_server.routes["/models/m.gguf"] = lambda h: h.redirect(
        "https://evil.example/m.gguf?sig=topsecret"
    )
    config = write_config(
        tmp_path / "c.toml",
        url=https_server.url("/models/m.gguf"),
        data=tiny_model_bytes,
        store=tmp_path / "s",
        ca_pem=ca_pem,
        allowed=https_server.origin + "/models/",
    )
    result = run_cli("fetch", "--config", str(config))
    assert result.returncode == 3
    assert (
        result.stderr.strip().splitlines()[-1]
        == "error: source_not_allowed: the model source is not allowed"
    )
    assert_no_secret(
        result.stderr + result.stdout, ["evil.example", "topsecret", https_server.origin]
    )


def test_network_failure_exits_1(tiny_model_bytes: bytes, ca_pem: Path, tmp_path: Path) -> None:
    with contextlib.closing(__import__("socket").socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    origin = f"https://127.0.0.1:{port}"
    config = write_config(
        tmp_path / "c.toml",
        url=origin + "/models/m.gguf",
        data=tiny_model_bytes,
        store=tmp_path / "s",
        ca_pem=ca_pem,
        allowed=origin + "/models/",
    )
    result = run_cli("fetch", "--config", str(config))
    assert result.returncode == 1
    assert (
        result.stderr.strip().splitlines()[-1]
        == "error: network_error: the model could not be downloaded"
    )


def test_invalid_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[model]\nname = "m"\nurl = "https://x.example/m?sig=topsecret"\nsha256 = "nothex"\nsize_bytes = 1\n'
    )
    result = run_cli("fetch", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: invalid_config: model.sha256: must be 64 hex characters"
    usage = run_cli("fetch")
    assert usage.returncode == 2


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.toml")), ids=lambda p: p.name)
def test_check_config_on_every_shipped_file(path: Path) -> None:
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "[model]" in result.stdout
    assert "[gateway]" in result.stdout


def test_two_processes_share_one_download(
    https_server: LoopbackServer, tiny_model_bytes: bytes, ca_pem: Path, tmp_path: Path
) -> None:
    # Slow enough that the second process starts while the first is still downloading.
    https_server.routes["/models/m.gguf"] = lambda h: h.serve(tiny_model_bytes, pause_s=0.1)
    config = write_config(
        tmp_path / "c.toml",
        url=https_server.url("/models/m.gguf"),
        data=tiny_model_bytes,
        store=tmp_path / "s",
        ca_pem=ca_pem,
        allowed=https_server.origin + "/models/",
    )
    args = [
        sys.executable,
        "-m",
        "supervisor",
        "--log-format",
        "json",
        "fetch",
        "--config",
        str(config),
    ]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out1, err1 = first.communicate(timeout=60)
    out2, err2 = second.communicate(timeout=60)
    assert (first.returncode, second.returncode) == (0, 0), err1 + err2
    assert out1.strip() == out2.strip() == "tiny-test verified"
    assert https_server.log.count("/models/m.gguf") == 1
    events = [
        json.loads(line)["event"] for line in (err1 + err2).splitlines() if line.startswith("{")
    ]
    assert "fetch.shared" in events or events.count("fetch.start") == 1
    assert events.count("fetch.start") == 1


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            check=True,
            capture_output=True,
        )
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def test_disk_full_mid_download_ends_cleanly(
    https_server: LoopbackServer, ca_pem: Path, tmp_path: Path
) -> None:
    data = os.urandom(4 * 1024 * 1024)
    with small_tmpfs(tmp_path / "small", "72m") as mount:
        store = mount / "store"
        filled = threading.Event()

        def fill_then_serve(h: Handler) -> None:
            # The free-space check has passed by now; fill the disk, so the writes hit ENOSPC.
            free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
            with open(mount / "filler", "wb") as handle:
                handle.write(b"\x00" * max(free - 1024 * 1024, 0))
            filled.set()
            h.serve(data)

        https_server.routes["/models/m.gguf"] = fill_then_serve
        config = write_config(
            tmp_path / "c.toml",
            url=https_server.url("/models/m.gguf"),
            data=data,
            store=store,
            ca_pem=ca_pem,
            allowed=https_server.origin + "/models/",
        )
        result = run_cli("fetch", "--config", str(config))
        assert filled.is_set()
        assert result.returncode == 1
        assert (
            result.stderr.strip().splitlines()[-1]
            == "error: disk_full: not enough free disk space for the model"
        )
        assert list((store / "blobs").iterdir()) == []
        assert str(store) not in result.stderr


def test_disk_full_is_refused_before_downloading(
    https_server: LoopbackServer, ca_pem: Path, tmp_path: Path
) -> None:
    data = os.urandom(1024)
    https_server.routes["/models/m.gguf"] = lambda h: h.serve(data)
    config = write_config(
        tmp_path / "c.toml",
        url=https_server.url("/models/m.gguf"),
        data=data,
        store=tmp_path / "s",
        ca_pem=ca_pem,
        allowed=https_server.origin + "/models/",
    )
    text = config.read_text().replace(f"size_bytes = {len(data)}", f"size_bytes = {2 * 1024**4}")
    config.write_text(text)
    result = run_cli("fetch", "--config", str(config))
    assert result.returncode == 1
    assert "error: disk_full:" in result.stderr
    assert https_server.log.requests == []
