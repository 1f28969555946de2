"""The supervisor: one task group that spawns the child, follows its health, restarts it.

Only this module knows all the pieces. Every lifecycle change is one call to
:func:`~supervisor.policy.transition_lifecycle` and one ``lifecycle.transition`` log event.

The loop, per child:

1. check the :class:`~supervisor.fetch.VerifiedModel` again (its blob must still match its
   verification record), link it into a private run folder, spawn (STOPPED -> STARTING);
2. probe readiness 50 ms after the spawn, then at growing intervals up to ``interval_s``; the
   start fails when the child exits (at once, with its exit code and last lines) or when it has
   been silent for ``start_timeout_s`` (a stall timer: output from the child extends it);
3. READY: probe every ``interval_s``; ``failures_before_restart`` failures in a row = hung; the
   child's exit is noticed at once (its exit is awaited, not polled);
4. after a failure: restart with exponential backoff and jitter, unless more than
   ``max_restarts`` restarts happened within ``window_s``: then give up (STOPPED, reason
   ``restart_limit``) and :meth:`Supervisor.run` raises :class:`ChildError`;
5. on shutdown: drain (stop admitting, let in-flight requests finish up to
   ``drain_timeout_s``), stop the child (SIGTERM, grace, SIGKILL), return.
"""

from __future__ import annotations

import enum
import os
import random
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import anyio
import anyio.abc
from prometheus_client import CollectorRegistry

from supervisor.admission import AdmissionGate
from supervisor.backends import Backend, ChildLaunch, ProbeOutcome, backend_for, prepare_launch
from supervisor.config import Config
from supervisor.errors import SupervisorError, unwrap_group
from supervisor.fetch import FetchError, VerifiedModel
from supervisor.gateway import Gateway, load_tokens
from supervisor.health import probe_client, probe_once, starting_delays
from supervisor.logging import get_logger
from supervisor.policy import (
    Lifecycle,
    LifecycleEvent,
    LifecycleState,
    Reason,
    create_lifecycle_state,
    evaluate_restart,
    restart_backoff,
    transition_lifecycle,
)
from supervisor.process import ChildProcess, SpawnError, open_child
from supervisor.watchdog import PsutilSampler, Sampler, Watchdog

__all__ = [
    "ChildError",
    "Service",
    "Supervisor",
    "Upstream",
]

_log = get_logger("runtime")

#: Lines of the child's last output put into the failure log event.
_TAIL_LINES: Final = 20

DrainWaiter = Callable[[float], Awaitable[bool]]


class ChildError(SupervisorError):
    """The child could not be started or kept running."""

    default_reason = Reason.RESTART_LIMIT


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where the ready child listens and the key it requires (a secret: never log it)."""

    host: str
    port: int
    api_key: str

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __repr__(self) -> str:
        return "Upstream(...)"


class _End(enum.Enum):
    """Why one child's run ended."""

    SHUTDOWN = "shutdown"  # asked to stop: do not restart
    RESTART = "restart"  # asked to restart (watchdog drain): restart without backoff
    EXITED = "exited"  # the child exited on its own
    START_TIMEOUT = "start_timeout"  # silent for start_timeout_s while starting
    UNHEALTHY = "unhealthy"  # too many failed probes in a row while ready


_FAILURE_REASONS: Final = {
    _End.EXITED: Reason.CHILD_EXITED,
    _End.START_TIMEOUT: Reason.START_TIMEOUT,
    _End.UNHEALTHY: Reason.UNHEALTHY,
}


async def _no_drain(_timeout_s: float) -> bool:
    return True


async def _first_of(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return as soon as any of ``waits`` returns."""
    async with anyio.create_task_group() as tg:

        async def one(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            tg.cancel_scope.cancel()

        for wait in waits:
            tg.start_soon(one, wait)


class Supervisor:
    """Keeps one llama.cpp child alive on a verified model. Run it with :meth:`run`."""

    def __init__(
        self,
        config: Config,
        model: VerifiedModel,
        *,
        drain_waiter: DrainWaiter = _no_drain,
        backend: Backend | None = None,
    ) -> None:
        if not isinstance(model, VerifiedModel):
            # Checked at run time as well as by type: nothing but fetch's result may be spawned.
            raise FetchError("only a verified model can be served", reason=Reason.NOT_VERIFIED)
        self.config = config
        self.model = model
        self.backend = backend or backend_for(config.backend.kind)
        self.drain_waiter = drain_waiter
        self.lifecycle: Lifecycle = create_lifecycle_state()
        self.stop_reason: Reason | None = None
        self.restarts = 0
        self.spawns = 0
        self.upstream: Upstream | None = None
        self.child: ChildProcess | None = None
        self.ready_event = anyio.Event()
        self._shutdown = anyio.Event()
        self._restart_request: Reason | None = None
        self._wake = anyio.Event()
        self._restart_times: list[float] = []
        self._was_ready = False
        self._state_listeners: list[Callable[[Lifecycle], None]] = []

    # -- observers ---------------------------------------------------------------------------

    @property
    def state(self) -> LifecycleState:
        return self.lifecycle.state

    def add_state_listener(self, listener: Callable[[Lifecycle], None]) -> None:
        self._state_listeners.append(listener)

    # -- requests from outside (signal handlers, the watchdog, the CLI) ------------------------

    def request_shutdown(self) -> None:
        """Drain, stop the child and make :meth:`run` return. Idempotent."""
        self._shutdown.set()
        self._wake.set()

    def request_restart(self, reason: Reason) -> None:
        """Drain and restart the child (the watchdog's remedy for sustained overload)."""
        if self._restart_request is None:
            self._restart_request = reason
        self._wake.set()

    async def wait_ready(self) -> None:
        await self.ready_event.wait()

    # -- lifecycle -----------------------------------------------------------------------------

    def _transition(self, event: LifecycleEvent, reason: Reason | None = None) -> bool:
        result = transition_lifecycle(self.lifecycle, event)
        if not result.ok or result.lifecycle is None:
            _log.error("lifecycle.refused", state=self.lifecycle.state.value, event=event.value)
            return False
        before = self.lifecycle.state
        self.lifecycle = result.lifecycle
        if before is not self.lifecycle.state:
            fields: dict[str, object] = {
                "model": self.model.name,
                "from_state": before.value,
                "to_state": self.lifecycle.state.value,
                "trigger": event.value,
            }
            if reason is not None:
                fields["reason"] = reason.value
            _log.info("lifecycle.transition", **fields)
            if self.lifecycle.state is LifecycleState.READY:
                self.ready_event.set()
            elif self.ready_event.is_set():
                self.ready_event = anyio.Event()
            for listener in self._state_listeners:
                listener(self.lifecycle)
        return True

    # -- the loop ------------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Supervise until shutdown (returns) or until restarts are exhausted (raises
        :class:`ChildError` with reason ``restart_limit``). ``task_status.started()`` is called
        once the first child is spawned."""
        failures = 0
        started = False
        while not self._shutdown.is_set():
            end = await self._run_child(task_status if not started else None)
            started = True
            if end is _End.SHUTDOWN or self._shutdown.is_set():
                break
            if end is _End.RESTART:
                failures = 0
                self.restarts += 1
                continue
            # A failure: count it against the restart intensity, then back off.
            reason = _FAILURE_REASONS[end]
            now = time.monotonic()
            verdict = evaluate_restart(
                self._restart_times,
                now,
                max_restarts=self.config.restart.max_restarts,
                window_s=self.config.restart.window_s,
            )
            if not verdict.ok:
                self.stop_reason = Reason.RESTART_LIMIT
                _log.error(
                    "child.gave_up",
                    model=self.model.name,
                    reason=reason.value,
                    restarts=self.restarts,
                    window_s=self.config.restart.window_s,
                )
                raise ChildError(
                    "the model server kept failing; restarts exhausted",
                    reason=Reason.RESTART_LIMIT,
                )
            self._restart_times = [
                t for t in self._restart_times if now - t < self.config.restart.window_s
            ]
            self._restart_times.append(now)
            # The backoff grows with failures in a row; a child that got READY resets it.
            failures = 1 if self._was_ready else failures + 1
            delay = restart_backoff(
                failures,
                initial_s=self.config.restart.backoff_initial_s,
                max_s=self.config.restart.backoff_max_s,
                jitter=random.random(),  # noqa: S311 - jitter, not cryptography
            )
            self.restarts += 1
            _log.warning(
                "child.restart_scheduled",
                model=self.model.name,
                reason=reason.value,
                attempt=failures,
                delay_s=round(delay, 3),
            )
            with anyio.move_on_after(delay):
                await self._shutdown.wait()

    async def _run_child(self, task_status: anyio.abc.TaskStatus[None] | None) -> _End:
        try:
            self.model.check()
        except FetchError:
            raise ChildError(
                "the model changed on disk since it was verified", reason=Reason.NOT_VERIFIED
            ) from None
        run_dir = tempfile.mkdtemp(prefix="llama-supervisor-")
        try:
            try:
                launch = prepare_launch(
                    self.backend,
                    self.config.backend,
                    run_dir=run_dir,
                    model_path=str(self.model.path),
                    model_name=self.model.name,
                )
            except OSError:
                raise ChildError(
                    "the model server could not be prepared", reason=Reason.SPAWN_FAILED
                ) from None
            self._restart_request = None
            self._was_ready = False
            self._wake = anyio.Event()
            self._transition(LifecycleEvent.START)
            self.spawns += 1
            try:
                async with open_child(
                    launch, name=self.model.name, grace_s=self.config.restart.stop_grace_s
                ) as child:
                    self.child = child
                    if task_status is not None:
                        task_status.started()
                    try:
                        end = await self._watch(child, launch)
                    except anyio.get_cancelled_exc_class():
                        self._settle(_End.SHUTDOWN, child)
                        raise
            except SpawnError as error:
                self._transition(LifecycleEvent.CRASH, Reason.SPAWN_FAILED)
                raise ChildError(error.message, reason=Reason.SPAWN_FAILED) from None
            finally:
                self.child = None
                self.upstream = None
            self._settle(end, child)
            return end
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)

    def _settle(self, end: _End, child: ChildProcess) -> None:
        """The lifecycle event that matches how the child's run ended (the child is reaped)."""
        state = self.lifecycle.state
        if end is _End.EXITED:
            tail = child.tail().splitlines()[-_TAIL_LINES:]
            _log.error(
                "child.exited",
                model=self.model.name,
                state=state.value,
                returncode=child.returncode,
                last_lines=tail,
            )
            self._transition(LifecycleEvent.CRASH, Reason.CHILD_EXITED)
        elif end in (_End.START_TIMEOUT, _End.UNHEALTHY):
            self._transition(LifecycleEvent.HEALTH_FAIL, _FAILURE_REASONS[end])
        elif state is LifecycleState.DRAINING:
            self._transition(LifecycleEvent.STOPPED)
        elif state is LifecycleState.STARTING:
            self._transition(LifecycleEvent.ABORT)
        elif state is LifecycleState.READY:  # asked to stop before a drain could start
            self._transition(LifecycleEvent.DRAIN)
            self._transition(LifecycleEvent.STOPPED)

    async def _watch(self, child: ChildProcess, launch: ChildLaunch) -> _End:
        """Run the exit watcher and the health loop side by side; the first verdict wins."""
        outcome: list[_End] = []

        async with anyio.create_task_group() as tg:

            def finish(end: _End) -> None:
                if not outcome:
                    outcome.append(end)
                tg.cancel_scope.cancel()

            async def exit_watcher() -> None:
                await child.wait()
                finish(_End.EXITED)

            async def health() -> None:
                finish(await self._health_loop(child, launch))

            tg.start_soon(exit_watcher)
            tg.start_soon(health)
        return outcome[0]

    async def _health_loop(self, child: ChildProcess, launch: ChildLaunch) -> _End:
        health = self.config.health
        async with probe_client(launch, health.timeout_s) as client:
            # STARTING: probe early, then less often; the stall timer restarts with each line
            # the child writes.
            delays = iter(starting_delays(health.interval_s))
            while True:
                if self._shutdown.is_set():
                    return _End.SHUTDOWN
                # Probe at the next scheduled time, or as soon as the child writes a line (it
                # logs as it becomes ready); a restart request waits for READY.
                with anyio.move_on_after(next(delays, health.interval_s)):
                    await _first_of(self._shutdown.wait, child.wait_output)
                if self._shutdown.is_set():
                    return _End.SHUTDOWN
                if await probe_once(client, self.backend, launch) is ProbeOutcome.READY:
                    break
                silent_for = time.monotonic() - child.last_output_at
                if silent_for > health.start_timeout_s:
                    _log.error(
                        "child.start_stalled",
                        model=self.model.name,
                        silent_s=round(silent_for, 3),
                    )
                    return _End.START_TIMEOUT
            self.upstream = Upstream("127.0.0.1", launch.port, launch.api_key)
            self._was_ready = True
            self._transition(LifecycleEvent.HEALTH_OK)
            _log.info(
                "child.ready",
                model=self.model.name,
                start_s=round(time.monotonic() - child.started_at, 3),
            )
            # READY: probe every interval_s; a drain request ends the loop.
            failed = 0
            while True:
                with anyio.move_on_after(health.interval_s):
                    await self._wake.wait()
                if self._shutdown.is_set() or self._restart_request is not None:
                    return await self._drain(
                        _End.SHUTDOWN if self._shutdown.is_set() else _End.RESTART
                    )
                outcome = await probe_once(client, self.backend, launch)
                if outcome is ProbeOutcome.READY:
                    if failed:
                        _log.info("child.health_recovered", model=self.model.name, after=failed)
                    failed = 0
                    continue
                failed += 1
                _log.warning(
                    "child.health_failed",
                    model=self.model.name,
                    consecutive=failed,
                    limit=health.failures_before_restart,
                )
                if failed >= health.failures_before_restart:
                    return _End.UNHEALTHY

    async def _drain(self, end: _End) -> _End:
        reason = self._restart_request if end is _End.RESTART else None
        self._transition(LifecycleEvent.DRAIN, reason)
        timeout = self.config.admission.drain_timeout_s
        drained = await self.drain_waiter(timeout)
        _log.info(
            "child.drained" if drained else "child.drain_timeout",
            model=self.model.name,
            timeout_s=timeout,
        )
        return end


class Service:
    """Everything ``serve`` runs, in one task group: the supervisor, the admission gate, the
    resource watchdog and the gateway. It is the gateway's view of the runtime."""

    def __init__(
        self,
        config: Config,
        model: VerifiedModel,
        *,
        sampler: Sampler | None = None,
        tokens: tuple[bytes, ...] | None = None,
        fetch_bytes: int = 0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.started_at = time.monotonic()
        self.fetch_bytes = fetch_bytes
        self.gate = AdmissionGate(
            max_in_flight=config.admission.max_in_flight,
            queue_bound=config.admission.queue_bound,
            queue_timeout_s=config.admission.queue_timeout_s,
            lifecycle=lambda: self.supervisor.lifecycle,
            observation=lambda: self.watchdog.observation(),
            limits=lambda: self.watchdog.effective_limits(),
        )
        self.supervisor = Supervisor(config, model, drain_waiter=self.gate.wait_idle)
        self.supervisor.add_state_listener(self._on_state)
        self.watchdog = Watchdog(
            config.limits,
            sampler if sampler is not None else PsutilSampler(),
            child_pid=lambda: self.supervisor.child.pid if self.supervisor.child else None,
            request_restart=self.supervisor.request_restart,
        )
        if tokens is None:
            tokens = load_tokens(os.environ.get(config.gateway.tokens_env))
        self.gateway = Gateway(
            config=config.gateway,
            gate=self.gate,
            view=self,
            backend=self.supervisor.backend,
            tokens=tokens,
            registry=registry,
        )

    # -- the gateway's view ---------------------------------------------------------------------

    @property
    def lifecycle(self) -> Lifecycle:
        return self.supervisor.lifecycle

    @property
    def upstream_target(self) -> tuple[str, int, str] | None:
        upstream = self.supervisor.upstream
        if upstream is None:
            return None
        return (upstream.host, upstream.port, upstream.api_key)

    @property
    def stop_reason(self) -> Reason | None:
        return self.supervisor.stop_reason

    def refusing_reason(self) -> Reason | None:
        return self.watchdog.refusing

    def status(self) -> dict[str, Any]:
        sample = self.watchdog.sample
        model = self.supervisor.model
        return {
            "state": self.supervisor.state.value,
            "model": model.name,
            "sha256": model.short_digest,
            "backend": self.supervisor.backend.kind,
            "restarts": self.supervisor.restarts,
            "stop_reason": self.stop_reason.value if self.stop_reason else None,
            "refusing": self.watchdog.refusing.value if self.watchdog.refusing else None,
            "resources": sample.as_dict() if sample is not None else None,
            "watchdog_actions": dict(self.watchdog.actions),
            "fetch_bytes": self.fetch_bytes,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
        }

    def _on_state(self, lifecycle: Lifecycle) -> None:
        if lifecycle.state is LifecycleState.DRAINING:
            self.gate.refuse_queue(Reason.DRAINING)

    # -- running --------------------------------------------------------------------------------

    def request_shutdown(self) -> None:
        self.supervisor.request_shutdown()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until shutdown; ``task_status.started(port)`` once the gateway listens.
        Raises :class:`ChildError` when the child cannot be kept running."""
        with unwrap_group():
            async with anyio.create_task_group() as tg:
                port = await tg.start(self.gateway.serve)
                task_status.started(port)
                tg.start_soon(self.watchdog.run)
                try:
                    await self.supervisor.run()
                except ChildError:
                    self.gate.refuse_queue(self.supervisor.stop_reason or Reason.RESTART_LIMIT)
                    raise
                finally:
                    tg.cancel_scope.cancel()
