"""The resource watchdog: fed values drive refuse -> drain -> restart -> resume; the real
samplers read a real child; NVML is optional and its absence is handled, not crashed on."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import httpx
import psutil
import pytest
from structlog.testing import capture_logs

from conftest import FAKE_SERVER, make_config
from supervisor.config import LimitsConfig
from supervisor.fetch import fetch_model
from supervisor.policy import LifecycleState, Reason
from supervisor.runtime import Service
from supervisor.watchdog import NvmlReader, PsutilSampler, ResourceSample, Watchdog

pytestmark = pytest.mark.anyio


class FedSampler:
    """Values set by the test; the real sampler is tested against a real child below."""

    def __init__(self) -> None:
        self.ram = 100

    def observable(self) -> frozenset[str]:
        return frozenset({"ram", "cpu"})

    def sample(self, pid: int | None) -> ResourceSample:
        return ResourceSample(ram_bytes=self.ram if pid else None, cpu_percent=1.0 if pid else None)


async def test_fed_values_refuse_then_drain_restart_and_resume(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        backend={"command": str(FAKE_SERVER), "args": ["--mode", "slow", "--delay", "0.01"]},
        limits={"max_ram_bytes": 1000, "sample_interval_s": 0.05, "drain_after_samples": 4},
        gateway={"port": 0},
    )
    model = await fetch_model(config.model, config.store.dir)
    sampler = FedSampler()
    service = Service(config, model, sampler=sampler)
    metrics = ""
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            port = await tg.start(service.run)
            url = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
                with anyio.fail_after(30):
                    await service.supervisor.wait_ready()
                    while service.watchdog.sample is None:
                        await anyio.sleep(0.01)
                assert (await client.post("/v1/completions", content=b"{}")).status_code == 200
                first_pid = service.supervisor.child.pid  # type: ignore[union-attr]

                sampler.ram = 5000  # over the limit
                with anyio.fail_after(10):
                    while service.watchdog.refusing is None:
                        await anyio.sleep(0.01)
                refused = await client.post("/v1/completions", content=b"{}")
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "ram_over_limit"
                assert refused.headers["retry-after"] == "5"
                assert (await client.get("/readyz")).status_code == 503

                # Sustained: drain, restart, and a new child.
                with anyio.fail_after(20):
                    while service.supervisor.spawns < 2:
                        await anyio.sleep(0.01)
                sampler.ram = 100
                with anyio.fail_after(20):
                    await service.supervisor.wait_ready()
                    while service.watchdog.refusing is not None:
                        await anyio.sleep(0.01)
                assert service.supervisor.child is not None
                assert service.supervisor.child.pid != first_pid
                ok = await client.post("/v1/completions", content=b"{}")
                assert ok.status_code == 200
                assert (await client.get("/readyz")).status_code == 200
                metrics = (await client.get("/metrics")).text
            service.request_shutdown()
    events = [e["event"] for e in logs]
    assert "watchdog.refuse" in events
    assert "watchdog.drain_restart" in events
    assert "watchdog.resume" in events
    drains = [
        e
        for e in logs
        if e["event"] == "lifecycle.transition" and e.get("reason") == "ram_over_limit"
    ]
    assert drains[0]["from_state"] == "ready"
    assert drains[0]["to_state"] == "draining"
    assert 'llama_supervisor_watchdog_actions_total{action="drain_restart"} 1.0' in metrics
    assert service.supervisor.state is LifecycleState.STOPPED


def test_hysteresis_does_not_flap() -> None:
    restarts: list[Reason] = []
    watchdog = Watchdog(
        LimitsConfig(max_cpu_percent=100.0, drain_after_samples=3),
        FedSampler(),
        child_pid=lambda: 1,
        request_restart=restarts.append,
    )

    def feed(cpu: float) -> Reason | None:
        watchdog.feed(ResourceSample(ram_bytes=1, cpu_percent=cpu), pid=1)
        return watchdog.refusing

    assert feed(50) is None
    assert feed(101) == Reason.CPU_OVER_LIMIT
    assert feed(95) == Reason.CPU_OVER_LIMIT  # under the limit, not yet under 90 % of it
    assert watchdog.effective_limits().max_cpu_percent == pytest.approx(90.0)
    assert feed(89) is None  # resumed
    assert watchdog.effective_limits().max_cpu_percent == 100.0
    assert feed(101) == Reason.CPU_OVER_LIMIT
    assert feed(101) == Reason.CPU_OVER_LIMIT
    assert restarts == []
    feed(101)  # the third in a row
    assert restarts == [Reason.CPU_OVER_LIMIT]
    assert watchdog.actions == {"refuse": 2, "resume": 1, "drain_restart": 1}
    # A new child starts with a clean slate.
    watchdog.feed(ResourceSample(ram_bytes=1, cpu_percent=10), pid=2)
    assert watchdog.refusing is None
    assert watchdog.over_count == 0


def test_unobservable_limit_is_logged_once_and_not_enforced() -> None:
    sampler = FedSampler()  # cannot read VRAM
    with capture_logs() as logs:
        watchdog = Watchdog(
            LimitsConfig(max_vram_bytes=1000),
            sampler,
            child_pid=lambda: 1,
            request_restart=lambda reason: None,
        )
        for _ in range(3):
            watchdog.feed(ResourceSample(ram_bytes=1, cpu_percent=1), pid=1)
    assert [e["event"] for e in logs] == ["watchdog.limit_not_observable"]
    assert logs[0]["resource"] == "vram"
    assert watchdog.enabled is False
    assert watchdog.refusing is None


def test_nvml_without_a_gpu_is_skipped_cleanly() -> None:
    reader = NvmlReader()  # the real nvidia-ml-py; no driver or no GPU on this machine
    if reader.available:
        pytest.skip("a GPU is present: the without-GPU path cannot be shown here")
    assert reader.why_not
    assert reader.used_by({os.getpid()}) is None
    sampler = PsutilSampler(reader)
    assert sampler.observable() == frozenset({"ram", "cpu"})
    sample = sampler.sample(os.getpid())
    assert sample.vram_bytes is None
    assert sample.ram_bytes is not None


def _fake_nvml(processes: list[Any], used: int) -> Any:
    """Stands in for pynvml where no GPU can produce the case."""
    return SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda index: "gpu0",
        nvmlDeviceGetComputeRunningProcesses=lambda handle: processes,
        nvmlDeviceGetGraphicsRunningProcesses=lambda handle: [],
        nvmlDeviceGetMemoryInfo=lambda handle: SimpleNamespace(used=used),
    )


def test_nvml_counts_only_our_processes_when_it_can_tell() -> None:
    processes = [
        SimpleNamespace(pid=10, usedGpuMemory=300),
        SimpleNamespace(pid=99, usedGpuMemory=5000),
    ]
    reader = NvmlReader(_fake_nvml(processes, used=5300))
    assert reader.available
    assert reader.used_by({10, 11}) == 300
    # Ours without a figure: the whole device counts (an over-estimate, never an under-estimate).
    reader = NvmlReader(_fake_nvml([SimpleNamespace(pid=10, usedGpuMemory=None)], used=5300))
    assert reader.used_by({10}) == 5300
    # PIDs from another namespace (none match): the whole device counts too.
    reader = NvmlReader(_fake_nvml([SimpleNamespace(pid=1234, usedGpuMemory=100)], used=700))
    assert reader.used_by({10}) == 700
    # Nothing on the GPU at all.
    assert NvmlReader(_fake_nvml([], used=0)).used_by({10}) == 0


def test_psutil_sampler_reads_a_real_child_and_its_descendants() -> None:
    # A parent that holds ~64 MiB and starts a child that holds ~32 MiB.
    code = (
        "import subprocess, sys, time\n"
        "ballast = bytearray(64 * 1024 * 1024)\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import time; b = bytearray(32 * 1024 * 1024); time.sleep(60)'])\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 10
        while not psutil.Process(proc.pid).children() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        sampler = PsutilSampler(NvmlReader(_fake_nvml([], used=0)))
        sample = sampler.sample(proc.pid)
        parent = psutil.Process(proc.pid)
        expected = parent.memory_info().rss + sum(
            c.memory_info().rss for c in parent.children(recursive=True)
        )
        assert sample.ram_bytes is not None
        assert sample.ram_bytes >= 96 * 1024 * 1024
        assert abs(sample.ram_bytes - expected) < 0.1 * expected
        assert sample.cpu_percent is not None
        assert sample.system_available_bytes is not None
        assert sample.system_available_bytes > 0
        assert sampler.sample(None).ram_bytes is None
    finally:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.communicate()
