"""The child process: its own process group, a parent-death signal, a log pump, clean stops.

* Started through a tiny exec shim that sets Linux's parent-death signal (SIGKILL) and then checks
  that the supervisor is still its parent (race-free: if the supervisor died between fork and
  ``prctl``, the shim exits instead of running an orphan). The signal is tied to the *thread*
  that forked, so children are always spawned from the event-loop thread, never from a worker
  thread that may end. Other platforms have no such signal: there, a supervisor killed with
  SIGKILL leaves its child running (the gap is stated in the README).
* ``start_new_session``: the child leads its own process group; stops signal the whole group.
* Stop: SIGTERM (and SIGCONT, so a stopped child can act on it) to the group, ``stop_grace_s``,
  then SIGKILL to the group, all under a shielded cancel scope; the child is always reaped and
  its pipe closed.
* stdout and stderr are pumped line by line into structlog (bounded line length, rate-limited),
  and the last 8 KiB are kept, with the API key redacted, for the failure report.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Final

import anyio
import anyio.abc

from supervisor.backends import ChildLaunch
from supervisor.errors import SupervisorError
from supervisor.logging import forget_secret, get_logger, redact_text, register_secret
from supervisor.policy import Reason

__all__ = [
    "ChildProcess",
    "LINES_PER_SECOND",
    "LINE_BURST",
    "MAX_LINE_CHARS",
    "SpawnError",
    "TAIL_CHARS",
    "open_child",
]

#: Lines longer than this are cut (a model's output can be one very long line).
MAX_LINE_CHARS: Final = 2048
#: Characters of recent output kept for the failure report.
TAIL_CHARS: Final = 8192
#: Log at most this many child lines per second (a burst of LINE_BURST first); count the rest.
LINES_PER_SECOND: Final = 20.0
LINE_BURST: Final = 100.0
#: How long to wait for the output pipe to close after the child is gone.
_PIPE_DRAIN_S: Final = 2.0

# Runs as ``python -I -S -c SHIM <parent pid> <argv...>``: set the parent-death signal, make
# sure the parent is still the supervisor, then become the real child.
_SHIM: Final = """\
import os, sys
parent = int(sys.argv[1])
if sys.platform.startswith("linux"):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, 9, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG, SIGKILL
        sys.stderr.write("llama-supervisor: cannot set the parent-death signal\\n")
        os._exit(126)
if os.getppid() != parent:
    os._exit(125)  # the supervisor is already gone: do not become an orphan
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError:
    sys.stderr.write("llama-supervisor: the backend command cannot be executed\\n")
    os._exit(127)
"""

_log = get_logger("process")


class SpawnError(SupervisorError):
    """The child could not be started at all."""

    default_reason = Reason.SPAWN_FAILED


class _LineLimiter:
    """A token bucket over child lines; remembers how many it held back."""

    def __init__(self) -> None:
        self.tokens = LINE_BURST
        self.last = time.monotonic()
        self.suppressed = 0

    def take(self, lines: int) -> int:
        """How many of ``lines`` may be logged now; the rest are counted as suppressed."""
        now = time.monotonic()
        self.tokens = min(LINE_BURST, self.tokens + (now - self.last) * LINES_PER_SECOND)
        self.last = now
        allowed = min(lines, int(self.tokens))
        self.tokens -= allowed
        self.suppressed += lines - allowed
        return allowed


class ChildProcess:
    """A running child. Made by :func:`open_child`, which also stops it."""

    def __init__(self, process: anyio.abc.Process, launch: ChildLaunch, name: str) -> None:
        self._process = process
        self._launch = launch
        self._name = name
        self._tail = bytearray()
        self._pump_done = anyio.Event()
        self._output = anyio.Event()
        self.started_at = time.monotonic()
        self.last_output_at = self.started_at

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    @property
    def launch(self) -> ChildLaunch:
        return self._launch

    def tail(self) -> str:
        """The last few KiB of the child's output, the API key redacted."""
        text = bytes(self._tail[-TAIL_CHARS:]).decode("utf-8", "replace")
        cut = text.find("\n") if len(self._tail) > TAIL_CHARS else -1
        return redact_text(text[cut + 1 :].replace(self._launch.api_key, "<redacted>"))

    async def wait_output(self) -> None:
        """Until the child writes something (the runtime probes right after: llama.cpp logs as
        it becomes ready, so readiness is seen in milliseconds without fast polling)."""
        await self._output.wait()

    async def wait(self) -> int:
        """Until the child exits; its exit code (negative: killed by that signal)."""
        return await self._process.wait()

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signum)

    async def stop(self, grace_s: float) -> int:
        """SIGTERM the group, wait ``grace_s``, SIGKILL the group; always reaps. Shielded."""
        with anyio.CancelScope(shield=True):
            if self._process.returncode is None:
                self._signal_group(signal.SIGTERM)
                self._signal_group(signal.SIGCONT)
                with anyio.move_on_after(grace_s):
                    await self._process.wait()
                if self._process.returncode is None:
                    _log.warning("child.kill", model=self._name, grace_s=grace_s)
                    self._signal_group(signal.SIGKILL)
                    await self._process.wait()
            # Anything else the child started in its group goes too.
            self._signal_group(signal.SIGKILL)
            with anyio.move_on_after(_PIPE_DRAIN_S):
                await self._pump_done.wait()
            await self._process.aclose()
        return self._process.returncode if self._process.returncode is not None else -9

    async def _pump(self) -> None:
        """Read the child's output: all of it into the tail, lines into the log as the rate
        limit allows. Lines the limit holds back are only counted, never decoded: llama.cpp
        logs several lines per request, and the hot path should not pay for them."""
        limiter = _LineLimiter()
        stream = self._process.stdout
        assert stream is not None
        pending = b""
        try:
            async for data in stream:
                self.last_output_at = time.monotonic()
                self._output.set()
                self._output = anyio.Event()
                self._tail += data
                if len(self._tail) > 2 * TAIL_CHARS:
                    del self._tail[: len(self._tail) - TAIL_CHARS]
                newlines = data.count(b"\n")
                if not newlines:  # part of a line: keep (a bounded end of) it
                    pending = (pending + data)[-MAX_LINE_CHARS * 4 :]
                    continue
                allowed = limiter.take(newlines)
                if not allowed:
                    pending = data.rsplit(b"\n", 1)[1]
                    continue
                *lines, pending = (pending + data).split(b"\n")
                for raw in lines[-allowed:]:
                    self._log_line(raw, limiter)
            if pending and limiter.take(1):
                self._log_line(pending, limiter)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            pass
        finally:
            if limiter.suppressed:
                _log.info("child.output_suppressed", model=self._name, lines=limiter.suppressed)
            self._pump_done.set()

    def _log_line(self, raw: bytes, limiter: _LineLimiter) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        if not text:
            return
        if len(text) > MAX_LINE_CHARS:
            text = text[:MAX_LINE_CHARS] + " [cut]"
        text = redact_text(text.replace(self._launch.api_key, "<redacted>"))
        if limiter.suppressed:
            _log.info("child.output_suppressed", model=self._name, lines=limiter.suppressed)
            limiter.suppressed = 0
        _log.info("child.output", model=self._name, line=text)


@contextlib.asynccontextmanager
async def open_child(
    launch: ChildLaunch, *, name: str, grace_s: float
) -> AsyncIterator[ChildProcess]:
    """Spawn the child described by ``launch``; on leaving, stop it (TERM, grace, KILL)."""
    argv = [sys.executable, "-I", "-S", "-c", _SHIM, str(os.getpid()), *launch.argv]
    register_secret(launch.api_key)
    try:
        try:
            process = await anyio.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=launch.cwd,
                env=dict(launch.env),
                start_new_session=True,
            )
        except OSError:
            raise SpawnError("the backend could not be started") from None
        child = ChildProcess(process, launch, name)
        _log.info("child.spawned", model=name, pid=process.pid, port=launch.port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(child._pump)
            try:
                yield child
            finally:
                code = await child.stop(grace_s)
                _log.info("child.reaped", model=name, pid=process.pid, returncode=code)
    finally:
        forget_secret(launch.api_key)
