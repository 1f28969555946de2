"""The resource watchdog: refuse, then drain and restart, on sustained overload.

Every ``sample_interval_s`` a :class:`Sampler` reads what the child uses: RSS of the child and its
descendants and CPU percent of the child (psutil), VRAM of the child's GPU processes (NVML, via
nvidia-ml-py), plus the system's available memory and the cgroup v2 memory limit for the status
page. The policy core judges the sample against the limits:

* over a limit: new requests are refused (``ram_over_limit``, ``vram_over_limit``,
  ``cpu_over_limit``) until the value is back under 90 % of the limit (hysteresis: no flapping);
* over for ``drain_after_samples`` samples in a row: the supervisor drains (in-flight requests
  finish, up to ``drain_timeout_s``), restarts the child and resumes.

A limit whose value cannot be observed here (VRAM without a GPU or without NVML) is not enforced
and this is logged once at start-up, rather than refusing every request for a value nobody can
read. Every step is a log event and a metric.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Protocol

import anyio
import anyio.to_thread
import psutil

from supervisor.config import LimitsConfig
from supervisor.logging import get_logger
from supervisor.policy import (
    Reason,
    ResourceLimits,
    ResourceObservation,
    evaluate_resource_limits,
)

__all__ = [
    "NvmlReader",
    "PsutilSampler",
    "RESUME_FRACTION",
    "ResourceSample",
    "Sampler",
    "Watchdog",
]

#: Refusing stops once every value is back under this fraction of its limit.
RESUME_FRACTION: Final = 0.9

_log = get_logger("watchdog")


@dataclass(frozen=True, slots=True)
class ResourceSample:
    """One reading. None = not observed."""

    ram_bytes: int | None = None
    vram_bytes: int | None = None
    cpu_percent: float | None = None
    system_available_bytes: int | None = None
    cgroup_limit_bytes: int | None = None

    def observation(self) -> ResourceObservation:
        return ResourceObservation(self.ram_bytes, self.vram_bytes, self.cpu_percent)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ram_bytes": self.ram_bytes,
            "vram_bytes": self.vram_bytes,
            "cpu_percent": self.cpu_percent,
            "system_available_bytes": self.system_available_bytes,
            "cgroup_limit_bytes": self.cgroup_limit_bytes,
        }


class Sampler(Protocol):
    """Reads one sample for a child (blocking; the watchdog calls it in a worker thread)."""

    def observable(self) -> frozenset[str]:
        """Which of "ram", "vram", "cpu" this sampler can read at all."""

    def sample(self, pid: int | None) -> ResourceSample: ...


class NvmlReader:
    """VRAM used by a set of processes, through NVML (nvidia-ml-py, imported as ``pynvml``).

    Without the library or without a GPU, ``available`` is False and nothing is read. When NVML
    lists the child's processes with their memory, only theirs counts; when it cannot tell (no
    per-process figure, or PIDs from another namespace), the devices' whole used memory counts:
    an over-estimate, never an under-estimate.
    """

    def __init__(self, module: Any = None) -> None:
        self.available = False
        self.why_not = ""
        self._nvml = module
        self._handles: list[Any] = []
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            count = int(self._nvml.nvmlDeviceGetCount())
            self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception as error:  # noqa: BLE001 - no library, no driver, no GPU: all the same
            self.why_not = type(error).__name__
            return
        if not self._handles:
            self.why_not = "no GPU"
            return
        self.available = True

    def used_by(self, pids: set[int]) -> int | None:
        if not self.available:
            return None
        nvml = self._nvml
        total = 0
        try:
            for handle in self._handles:
                processes = list(nvml.nvmlDeviceGetComputeRunningProcesses(handle))
                with contextlib.suppress(Exception):
                    processes += list(nvml.nvmlDeviceGetGraphicsRunningProcesses(handle))
                ours = [p for p in processes if int(p.pid) in pids]
                if ours and all(p.usedGpuMemory is not None for p in ours):
                    total += sum(int(p.usedGpuMemory) for p in ours)
                elif ours or (processes and not any(int(p.pid) in pids for p in processes)):
                    # Ours without figures, or PIDs we cannot match: count the whole device.
                    total += int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
        except Exception:  # noqa: BLE001 - a failed read is "not observed", never a crash
            return None
        return total


def _cgroup_memory_limit() -> int | None:
    """The cgroup v2 memory.max of this process, when there is one."""
    try:
        line = Path("/proc/self/cgroup").read_text().splitlines()[0]
        relative = line.split("::", 1)[1] if line.startswith("0::") else None
        if relative is None:
            return None
        value = (Path("/sys/fs/cgroup") / relative.lstrip("/") / "memory.max").read_text().strip()
    except (OSError, IndexError):
        return None
    return int(value) if value.isdigit() else None


class PsutilSampler:
    """The real sampler: psutil for RAM and CPU, NVML for VRAM."""

    def __init__(self, nvml: NvmlReader | None = None) -> None:
        self.nvml = nvml if nvml is not None else NvmlReader()
        self._process: psutil.Process | None = None

    def observable(self) -> frozenset[str]:
        return frozenset({"ram", "cpu", "vram"} if self.nvml.available else {"ram", "cpu"})

    def sample(self, pid: int | None) -> ResourceSample:
        available = psutil.virtual_memory().available
        cgroup = _cgroup_memory_limit()
        if pid is None:
            self._process = None
            return ResourceSample(system_available_bytes=available, cgroup_limit_bytes=cgroup)
        try:
            if self._process is None or self._process.pid != pid:
                self._process = psutil.Process(pid)
                self._process.cpu_percent(None)  # primes the counter; the next call is real
            process = self._process
            with process.oneshot():
                ram = process.memory_info().rss
                cpu = process.cpu_percent(None)
                family = process.children(recursive=True)
            pids = {pid}
            for child in family:
                with contextlib.suppress(psutil.Error):
                    ram += child.memory_info().rss
                    pids.add(child.pid)
        except psutil.Error:
            return ResourceSample(system_available_bytes=available, cgroup_limit_bytes=cgroup)
        return ResourceSample(
            ram_bytes=ram,
            vram_bytes=self.nvml.used_by(pids),
            cpu_percent=cpu,
            system_available_bytes=available,
            cgroup_limit_bytes=cgroup,
        )


def _scaled(limits: ResourceLimits, fraction: float) -> ResourceLimits:
    def scale(value: int | float | None) -> float | None:
        return None if value is None else value * fraction

    return ResourceLimits(
        max_ram_bytes=scale(limits.max_ram_bytes),
        max_vram_bytes=scale(limits.max_vram_bytes),
        max_cpu_percent=scale(limits.max_cpu_percent),
    )


class Watchdog:
    """Samples the child; tells the gate what to refuse; asks the supervisor to drain."""

    def __init__(
        self,
        config: LimitsConfig,
        sampler: Sampler,
        *,
        child_pid: Callable[[], int | None],
        request_restart: Callable[[Reason], None],
    ) -> None:
        self.config = config
        self.sampler = sampler
        self._child_pid = child_pid
        self._request_restart = request_restart
        limits = config.resource_limits()
        observable = sampler.observable()
        for resource, field in (
            ("ram", "max_ram_bytes"),
            ("vram", "max_vram_bytes"),
            ("cpu", "max_cpu_percent"),
        ):
            if getattr(limits, field) is not None and resource not in observable:
                _log.warning("watchdog.limit_not_observable", resource=resource)
                limits = replace(limits, **{field: None})
        self.limits = limits
        self.enabled = any(
            value is not None
            for value in (limits.max_ram_bytes, limits.max_vram_bytes, limits.max_cpu_percent)
        )
        self.sample: ResourceSample | None = None
        self._observation = ResourceObservation()
        self._sampled_pid: int | None = None
        self.refusing: Reason | None = None
        self.over_count = 0
        self.actions: dict[str, int] = {"refuse": 0, "resume": 0, "drain_restart": 0}

    # -- what the gate reads -----------------------------------------------------------------------

    def observation(self) -> ResourceObservation:
        return self._observation

    def effective_limits(self) -> ResourceLimits:
        """The limits the gate applies now: lowered to RESUME_FRACTION while refusing."""
        if self.refusing is not None:
            return _scaled(self.limits, RESUME_FRACTION)
        return self.limits

    # -- the loop --------------------------------------------------------------------------------

    def feed(self, sample: ResourceSample, pid: int | None) -> None:
        """Judge one sample (the loop's step; tests call it directly)."""
        self.sample = sample
        if pid != self._sampled_pid:  # a new child: its predecessor's history does not count
            self._sampled_pid = pid
            self.over_count = 0
            if self.refusing is not None:
                self._resume()
        self._observation = sample.observation()
        if not self.enabled or pid is None:
            return
        raw = evaluate_resource_limits(self._observation, self.limits)
        over = not raw.ok and raw.reason in (
            Reason.RAM_OVER_LIMIT,
            Reason.VRAM_OVER_LIMIT,
            Reason.CPU_OVER_LIMIT,
        )
        if self.refusing is None and not raw.ok:
            self.refusing = Reason(raw.reason)
            self.actions["refuse"] += 1
            _log.warning("watchdog.refuse", reason=self.refusing.value)
        elif self.refusing is not None:
            release = evaluate_resource_limits(
                self._observation, _scaled(self.limits, RESUME_FRACTION)
            )
            if release.ok:
                self._resume()
        self.over_count = self.over_count + 1 if over else 0
        if self.over_count >= self.config.drain_after_samples:
            self.over_count = 0
            self.actions["drain_restart"] += 1
            reason = Reason(raw.reason)
            _log.error(
                "watchdog.drain_restart",
                reason=reason.value,
                samples=self.config.drain_after_samples,
            )
            self._request_restart(reason)

    def _resume(self) -> None:
        self.actions["resume"] += 1
        _log.info("watchdog.resume", reason=self.refusing.value if self.refusing else None)
        self.refusing = None

    async def run(self) -> None:
        """Sample every ``sample_interval_s`` (and at once when the child changes) until
        cancelled."""
        interval = self.config.sample_interval_s
        last = 0.0
        while True:
            pid = self._child_pid()
            now = time.monotonic()
            if now - last >= interval or pid != self._sampled_pid:
                last = now
                sample = await anyio.to_thread.run_sync(self.sampler.sample, pid)
                self.feed(sample, pid)
            await anyio.sleep(min(interval, 0.1))
