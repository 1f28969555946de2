"""Child supervision with real processes: llama.cpp's server and llama-cpp-python's server on the
tiny model, real signals, and small scripts only where llama.cpp cannot produce the case."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest
from structlog.testing import capture_logs

from conftest import FAKE_SERVER, ROOT, make_config
from supervisor.config import Config
from supervisor.fetch import FetchError, VerifiedModel, fetch_model
from supervisor.policy import LifecycleState, Reason
from supervisor.runtime import ChildError, Supervisor

pytestmark = pytest.mark.anyio


async def verified(config: Config) -> VerifiedModel:
    return await fetch_model(config.model, config.store.dir)


@asynccontextmanager
async def running(supervisor: Supervisor) -> AsyncIterator[list[BaseException]]:
    """Run the supervisor in the background; on leaving, shut it down and wait for run()."""
    errors: list[BaseException] = []
    done = anyio.Event()

    async def run() -> None:
        try:
            await supervisor.run()
        except ChildError as error:
            errors.append(error)
        finally:
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            yield errors
        finally:
            supervisor.request_shutdown()
            with anyio.fail_after(30):
                await done.wait()


def gone(pid: int) -> bool:
    """The process no longer exists (reaped: not even a zombie), nor does its group."""
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        status = None
    try:
        os.killpg(pid, 0)
        group_alive = True
    except ProcessLookupError:
        group_alive = False
    return status is None and not group_alive


async def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.02)


async def completion(supervisor: Supervisor) -> dict[str, Any]:
    upstream = supervisor.upstream
    assert upstream is not None
    async with httpx.AsyncClient(base_url=upstream.base_url, trust_env=False) as client:
        response = await client.post(
            "/v1/completions",
            json={"prompt": "hello", "max_tokens": 4},
            headers={"Authorization": f"Bearer {upstream.api_key}"},
        )
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        unauthorised = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert unauthorised.status_code == 401  # the per-spawn key is required
        return result


def llama_server_config(tmp_path: Path, binary: str, **sections: dict[str, Any]) -> Config:
    backend = {
        "kind": "llama-server",
        "command": binary,
        "args": ["--ctx-size", "512", "--threads", "1"],
    }
    return make_config(tmp_path, backend={**backend, **sections.pop("backend", {})}, **sections)


def fake_config(tmp_path: Path, mode: str, **sections: dict[str, Any]) -> Config:
    backend = {"kind": "llama-server", "command": str(FAKE_SERVER), "args": ["--mode", mode]}
    return make_config(tmp_path, backend=backend, **sections)


# -- both backends: start, ready, one completion, stop -------------------------------------------


async def test_llama_server_start_ready_complete_stop(
    tmp_path: Path, llama_server_bin: str
) -> None:
    config = llama_server_config(tmp_path, llama_server_bin)
    supervisor = Supervisor(config, await verified(config))
    with capture_logs() as logs:
        async with running(supervisor):
            with anyio.fail_after(30):
                await supervisor.wait_ready()
            assert supervisor.state.value == "ready"
            child = supervisor.child
            assert child is not None
            pid = child.pid
            result = await completion(supervisor)
            assert result["model"] == "tiny-llama"  # the alias, not the store path
            assert len(result["choices"]) == 1
    assert supervisor.state is LifecycleState.STOPPED
    assert gone(pid)
    transitions = [
        (e["from_state"], e["to_state"]) for e in logs if e["event"] == "lifecycle.transition"
    ]
    assert transitions == [
        ("stopped", "starting"),
        ("starting", "ready"),
        ("ready", "draining"),
        ("draining", "stopped"),
    ]
    text = repr(logs)
    assert str(config.store.dir) not in text
    assert config.model.sha256 not in text


async def test_llama_cpp_python_start_ready_complete_stop(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        backend={"kind": "llama-cpp-python", "command": sys.executable, "args": ["--n_ctx", "512"]},
        health={"start_timeout_s": 60.0},
    )
    supervisor = Supervisor(config, await verified(config))
    async with running(supervisor):
        with anyio.fail_after(60):
            await supervisor.wait_ready()
        child = supervisor.child
        assert child is not None
        pid = child.pid
        result = await completion(supervisor)
        assert "store" not in result["model"]  # a relative name, never the store path
        assert result["model"] == "tiny-llama.gguf"
    assert supervisor.state is LifecycleState.STOPPED
    assert gone(pid)


# -- restarts --------------------------------------------------------------------------------------


async def test_kill_9_while_ready_restarts(tmp_path: Path, llama_server_bin: str) -> None:
    config = llama_server_config(tmp_path, llama_server_bin)
    supervisor = Supervisor(config, await verified(config))
    with capture_logs() as logs:
        async with running(supervisor):
            with anyio.fail_after(30):
                await supervisor.wait_ready()
            assert supervisor.child is not None
            first = supervisor.child.pid
            os.kill(first, signal.SIGKILL)
            await wait_for(
                lambda: supervisor.spawns == 2 and supervisor.state is LifecycleState.READY
            )
            assert supervisor.child is not None
            assert supervisor.child.pid != first
            assert gone(first)
            await completion(supervisor)
    assert supervisor.restarts == 1
    exited = [e for e in logs if e["event"] == "child.exited"]
    assert exited[0]["returncode"] == -signal.SIGKILL
    assert exited[0]["state"] == "ready"


async def test_sigstop_fails_probes_and_restarts(tmp_path: Path, llama_server_bin: str) -> None:
    config = llama_server_config(
        tmp_path,
        llama_server_bin,
        health={"interval_s": 0.1, "timeout_s": 0.2, "failures_before_restart": 2},
        restart={"stop_grace_s": 0.5},
    )
    supervisor = Supervisor(config, await verified(config))
    with capture_logs() as logs:
        async with running(supervisor):
            with anyio.fail_after(30):
                await supervisor.wait_ready()
            assert supervisor.child is not None
            hung = supervisor.child.pid
            os.kill(hung, signal.SIGSTOP)
            await wait_for(
                lambda: supervisor.spawns == 2 and supervisor.state is LifecycleState.READY
            )
            assert gone(hung)
    events = [e["event"] for e in logs]
    assert events.count("child.health_failed") >= 2
    unhealthy = [
        e for e in logs if e["event"] == "lifecycle.transition" and e.get("reason") == "unhealthy"
    ]
    assert unhealthy
    assert unhealthy[0]["from_state"] == "ready"


async def test_child_exiting_at_once_backs_off_then_gives_up(tmp_path: Path) -> None:
    config = fake_config(
        tmp_path,
        "exit",
        restart={
            "max_restarts": 3,
            "window_s": 60.0,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 1.0,
        },
    )
    supervisor = Supervisor(config, await verified(config))
    with capture_logs() as logs:
        async with running(supervisor) as errors:
            await wait_for(lambda: bool(errors), timeout=30)
    assert isinstance(errors[0], ChildError)
    assert errors[0].reason == Reason.RESTART_LIMIT
    assert supervisor.spawns == 4  # the first start and 3 restarts
    assert supervisor.state is LifecycleState.STOPPED
    assert supervisor.stop_reason == Reason.RESTART_LIMIT
    delays = [e["delay_s"] for e in logs if e["event"] == "child.restart_scheduled"]
    assert len(delays) == 3
    assert delays == sorted(delays)  # exponential with equal jitter: never shrinking
    assert delays[-1] > delays[0]
    exited = [e for e in logs if e["event"] == "child.exited"]
    assert exited[0]["returncode"] == 3
    assert exited[0]["state"] == "starting"
    assert "fake: failing on purpose" in exited[0]["last_lines"]
    assert "child.gave_up" in [e["event"] for e in logs]


async def test_child_ignoring_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    config = fake_config(tmp_path, "ignore-term", restart={"stop_grace_s": 0.3})
    supervisor = Supervisor(config, await verified(config))
    with capture_logs() as logs:
        async with running(supervisor):
            with anyio.fail_after(30):
                await supervisor.wait_ready()
            assert supervisor.child is not None
            pid = supervisor.child.pid
    assert gone(pid)
    kills = [e for e in logs if e["event"] == "child.kill"]
    assert kills
    assert kills[0]["grace_s"] == 0.3
    reaped = [e for e in logs if e["event"] == "child.reaped"]
    assert reaped[-1]["returncode"] == -signal.SIGKILL


async def test_start_stall_timer_gives_up_on_a_silent_child(tmp_path: Path) -> None:
    config = fake_config(
        tmp_path,
        "silent",
        health={"start_timeout_s": 0.5},
        restart={"max_restarts": 0, "stop_grace_s": 0.5},
    )
    supervisor = Supervisor(config, await verified(config))
    with capture_logs() as logs:
        async with running(supervisor) as errors:
            await wait_for(lambda: bool(errors), timeout=30)
    assert errors[0].reason == Reason.RESTART_LIMIT  # type: ignore[attr-defined]
    events = [e["event"] for e in logs]
    assert "child.start_stalled" in events
    stalled = [
        e
        for e in logs
        if e["event"] == "lifecycle.transition" and e.get("reason") == "start_timeout"
    ]
    assert stalled[0]["from_state"] == "starting"


# -- what the child gets -----------------------------------------------------------------------------


async def test_child_environment_is_explicit_and_key_is_redacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMA_SUPERVISOR_TOKENS", "client-token-secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    config = fake_config(tmp_path, "print-env")
    supervisor = Supervisor(config, await verified(config))
    with capture_logs() as logs:
        async with running(supervisor):
            with anyio.fail_after(30):
                await supervisor.wait_ready()
            assert supervisor.child is not None
            assert supervisor.upstream is not None
            key = supervisor.upstream.api_key
            await wait_for(lambda: "fake key:" in supervisor.child.tail())
            tail = supervisor.child.tail()
    assert key not in tail
    assert "fake key: <redacted>" in tail
    names = next(line for line in tail.splitlines() if line.startswith("fake env names:")).split()
    assert "LLAMA_SUPERVISOR_TOKENS" not in names
    assert "AWS_SECRET_ACCESS_KEY" not in names
    assert "PATH" in names
    text = repr(logs)
    assert key not in text
    assert "client-token-secret" not in text


async def test_chatty_child_logs_are_rate_limited(tmp_path: Path) -> None:
    config = fake_config(tmp_path, "chatty")
    supervisor = Supervisor(config, await verified(config))
    with capture_logs() as logs:
        async with running(supervisor):
            with anyio.fail_after(30):
                await supervisor.wait_ready()
            await anyio.sleep(1.0)
            assert supervisor.child is not None
            assert len(supervisor.child.tail()) <= 8192 + 2048
    lines = [e for e in logs if e["event"] == "child.output"]
    assert len(lines) <= 100 + 20 * 5  # the burst, then 20 per second
    assert any(e["event"] == "child.output_suppressed" for e in logs)


# -- only verified models are spawned ---------------------------------------------------------------


async def test_unverified_model_is_refused_before_any_spawn(tmp_path: Path) -> None:
    config = fake_config(tmp_path, "ignore-term")
    with pytest.raises(FetchError) as info:
        Supervisor(config, Path("/tmp/anything.gguf"))  # type: ignore[arg-type]
    assert info.value.reason == Reason.NOT_VERIFIED

    model = await verified(config)
    os.chmod(model.path, 0o644)
    model.path.write_bytes(b"\x00" * model.size_bytes)  # tampered after verification
    supervisor = Supervisor(config, model)
    with pytest.raises(ChildError) as failed:
        await supervisor.run()
    assert failed.value.reason == Reason.NOT_VERIFIED
    assert supervisor.spawns == 0


# -- the supervisor as a process --------------------------------------------------------------------


def write_config_file(tmp_path: Path, binary: str) -> Path:
    path = tmp_path / "serve.toml"
    model = ROOT / "config" / "models" / "tiny-llama.gguf"
    import hashlib

    path.write_text(
        f"""
[model]
name = "tiny-llama"
url = "file:{model}"
sha256 = "{hashlib.sha256(model.read_bytes()).hexdigest()}"
size_bytes = {model.stat().st_size}
[store]
dir = "{tmp_path / "store"}"
[backend]
command = "{binary}"
args = ["--ctx-size", "512", "--threads", "1"]
[health]
interval_s = 0.2
[restart]
stop_grace_s = 5.0
[gateway]
port = 0
"""
    )
    return path


def start_serve(config: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "supervisor",
            "--log-format",
            "json",
            "serve",
            "--config",
            str(config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "<name> ready at http://127.0.0.1:<port>/v1"
    assert line.startswith("tiny-llama ready at http://127.0.0.1:"), (
        proc.stderr.read() if proc.stderr else ""
    )
    children = psutil.Process(proc.pid).children()
    assert len(children) == 1
    return proc, children[0].pid


def test_supervisor_sigkilled_leaves_no_child(tmp_path: Path, llama_server_bin: str) -> None:
    proc, child = start_serve(write_config_file(tmp_path, llama_server_bin))
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)  # reaps it and closes its pipes
    deadline = time.monotonic() + 1.0
    while psutil.pid_exists(child) and time.monotonic() < deadline:
        try:
            if psutil.Process(child).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    still_running = (
        psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE
    )
    assert not still_running, "the child outlived its SIGKILLed supervisor by more than 1 s"


def test_supervisor_sigterm_drains_and_exits_0(tmp_path: Path, llama_server_bin: str) -> None:
    proc, child = start_serve(write_config_file(tmp_path, llama_server_bin))
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    events = [line for line in err.splitlines() if '"lifecycle.transition"' in line]
    assert any('"to_state": "draining"' in line for line in events)
    assert '"to_state": "stopped"' in events[-1]


async def test_backoff_resets_once_a_child_was_ready(tmp_path: Path) -> None:
    config = fake_config(tmp_path, "ignore-term", restart={"stop_grace_s": 0.2})
    supervisor = Supervisor(config, await verified(config))
    with capture_logs() as logs:
        async with running(supervisor):
            for spawn in (1, 2, 3):
                await wait_for(
                    lambda spawn=spawn: (
                        supervisor.spawns == spawn and supervisor.state is LifecycleState.READY
                    )
                )
                assert supervisor.child is not None
                os.kill(supervisor.child.pid, signal.SIGKILL)
            await wait_for(
                lambda: supervisor.spawns == 4 and supervisor.state is LifecycleState.READY
            )
    attempts = [e["attempt"] for e in logs if e["event"] == "child.restart_scheduled"]
    assert attempts == [1, 1, 1]  # each crash followed a READY child: no growing backoff
