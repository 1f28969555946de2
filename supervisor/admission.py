"""The admission gate: at most ``max_in_flight`` requests upstream, at most ``queue_bound`` waiting.

Every decision comes from :func:`supervisor.policy.evaluate_runtime_request` (lifecycle, then
resources, then the admission counters). The gate is built for the gateway's hot path: the common
case (a free slot) is one synchronous call, no task and no future. Waiting requests queue in FIFO
order and are handed a slot directly when one is released (no barging past the queue). A waiter
that is cancelled leaves the queue at once; one that waits ``queue_timeout_s`` is refused with
``queue_timeout``.

Callback-based at its core (the gateway runs on asyncio protocols), with :meth:`acquire` as the
awaitable form.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from supervisor.policy import (
    AdmissionState,
    Lifecycle,
    Reason,
    ResourceLimits,
    ResourceObservation,
    Verdict,
    create_admission_state,
    evaluate_runtime_request,
    record_dequeued,
    record_in_flight,
    record_queued,
    record_released,
)

__all__ = [
    "AdmissionGate",
    "AdmissionRefused",
    "Ticket",
]

Grant = Callable[[Verdict, float], None]
"""Called once for a queued request: (verdict, seconds waited). ok = it holds a slot now."""


class AdmissionRefused(Exception):
    """Raised by :meth:`AdmissionGate.acquire` with the refusal's reason."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.value)
        self.reason = reason


class Ticket:
    """A place in the queue. ``cancel()`` leaves it (idempotent, O(1))."""

    __slots__ = ("_gate", "_timer", "callback", "done", "enqueued_at")

    def __init__(self, gate: AdmissionGate, callback: Grant) -> None:
        self._gate = gate
        self.callback = callback
        self.enqueued_at = time.monotonic()
        self.done = False
        self._timer: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self._gate._leave_queue(self)


_OK_ADMITTED: Final = Verdict(True, Reason.OK)


class AdmissionGate:
    """In-flight limit, bounded FIFO queue and queue timeout, decided by the policy core."""

    def __init__(
        self,
        *,
        max_in_flight: int,
        queue_bound: int,
        queue_timeout_s: float,
        lifecycle: Callable[[], Lifecycle],
        observation: Callable[[], ResourceObservation] = ResourceObservation,
        limits: Callable[[], ResourceLimits] = ResourceLimits,
    ) -> None:
        self.state: AdmissionState = create_admission_state(
            max_in_flight=max_in_flight, queue_bound=queue_bound
        )
        self.queue_timeout_s = queue_timeout_s
        self._lifecycle = lifecycle
        self._observation = observation
        self._limits = limits
        self._queue: deque[Ticket] = deque()
        self._idle_waiters: list[asyncio.Future[None]] = []
        self.peak_in_flight = 0
        self.peak_queued = 0

    # -- observers -------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self.state.in_flight

    @property
    def queued(self) -> int:
        return self.state.queued

    def _verdict(self) -> Verdict:
        return evaluate_runtime_request(
            lifecycle=self._lifecycle(),
            admission=self.state,
            observation=self._observation(),
            limits=self._limits(),
        )

    # -- the fast path ---------------------------------------------------------------------------

    def try_acquire(self) -> Verdict:
        """Take a slot now if the policy allows. ok: the caller holds a slot and must
        :meth:`release` it. AT_CAPACITY: the caller may :meth:`enqueue`. Anything else: refused.

        A free slot is not taken while others wait: they were first."""
        verdict = self._verdict()
        if verdict.ok and self.state.queued == 0:
            self.state = record_in_flight(self.state)
            if self.state.in_flight > self.peak_in_flight:
                self.peak_in_flight = self.state.in_flight
            return verdict
        if verdict.ok:  # a slot is free but the queue is not empty: wait behind it
            return Verdict(False, Reason.AT_CAPACITY)
        return verdict

    def enqueue(self, callback: Grant) -> Ticket | Verdict:
        """Wait for a slot in FIFO order; a full queue is refused (QUEUE_FULL) at once.
        ``callback`` is called exactly once, unless the ticket is cancelled first."""
        if self.state.queued >= self.state.queue_bound:
            return Verdict(False, Reason.QUEUE_FULL)
        ticket = Ticket(self, callback)
        self.state = record_queued(self.state)
        if self.state.queued > self.peak_queued:
            self.peak_queued = self.state.queued
        self._queue.append(ticket)
        loop = asyncio.get_running_loop()
        ticket._timer = loop.call_later(self.queue_timeout_s, self._expire, ticket)
        return ticket

    def release(self) -> None:
        """Give a slot back; the first waiters that the policy admits take it."""
        self.state = record_released(self.state)
        self._grant_waiters()
        if self.state.in_flight == 0 and self._idle_waiters:
            for future in self._idle_waiters:
                if not future.done():
                    future.set_result(None)
            self._idle_waiters.clear()

    def _grant_waiters(self) -> None:
        while self._queue and self.state.in_flight < self.state.max_in_flight:
            ticket = self._queue.popleft()
            if ticket.done:  # cancelled or timed out: already counted out
                continue
            ticket.done = True
            if ticket._timer is not None:
                ticket._timer.cancel()
            self.state = record_dequeued(self.state)
            verdict = self._verdict()
            waited = time.monotonic() - ticket.enqueued_at
            if verdict.ok:
                self.state = record_in_flight(self.state)
                if self.state.in_flight > self.peak_in_flight:
                    self.peak_in_flight = self.state.in_flight
                ticket.callback(_OK_ADMITTED, waited)
            else:  # not admissible any more (draining, over a limit): refused, no slot taken
                ticket.callback(verdict, waited)

    def refuse_queue(self, reason: Reason) -> None:
        """Refuse everyone waiting (the server is draining or gave up)."""
        while self._queue:
            ticket = self._queue.popleft()
            if ticket.done:
                continue
            ticket.done = True
            if ticket._timer is not None:
                ticket._timer.cancel()
            self.state = record_dequeued(self.state)
            ticket.callback(Verdict(False, reason), time.monotonic() - ticket.enqueued_at)

    def _leave_queue(self, ticket: Ticket) -> None:
        # Cancelled: counted out now; the tombstone stays in the deque until it reaches the front.
        if ticket._timer is not None:
            ticket._timer.cancel()
        self.state = record_dequeued(self.state)
        self._compact()

    def _expire(self, ticket: Ticket) -> None:
        if ticket.done:
            return
        ticket.done = True
        self.state = record_dequeued(self.state)
        self._compact()
        ticket.callback(Verdict(False, Reason.QUEUE_TIMEOUT), time.monotonic() - ticket.enqueued_at)

    def _compact(self) -> None:
        # Drop tombstones from the front so the deque never grows past the live waiters by much.
        while self._queue and self._queue[0].done:
            self._queue.popleft()
        if len(self._queue) > 2 * self.state.queue_bound + 16:
            self._queue = deque(ticket for ticket in self._queue if not ticket.done)

    # -- awaitable forms -------------------------------------------------------------------------

    async def acquire(self) -> float:
        """Take a slot, waiting in the queue if needed; returns the seconds waited.
        Raises :class:`AdmissionRefused`. Cancellation leaves the queue at once."""
        verdict = self.try_acquire()
        if verdict.ok:
            return 0.0
        if verdict.reason != Reason.AT_CAPACITY:
            raise AdmissionRefused(Reason(verdict.reason))
        future: asyncio.Future[tuple[Verdict, float]] = asyncio.get_running_loop().create_future()

        def granted(result: Verdict, waited: float) -> None:
            if future.done():
                # The waiting task was cancelled (which cancels this future at once) but has not
                # run its handler yet: pass the slot straight on instead of leaking it.
                if result.ok:
                    self.release()
                return
            future.set_result((result, waited))

        ticket = self.enqueue(granted)
        if isinstance(ticket, Verdict):
            raise AdmissionRefused(Reason(ticket.reason))
        try:
            result, waited = await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                if future.result()[0].ok:
                    self.release()  # granted just as we were cancelled: pass the slot on
            else:
                ticket.cancel()  # still waiting: leave the queue (a no-op once granted)
            raise
        if not result.ok:
            raise AdmissionRefused(Reason(result.reason))
        return waited

    async def wait_idle(self, timeout_s: float) -> bool:
        """Until no request is in flight, or ``timeout_s``; True when idle (for drains)."""
        if self.state.in_flight == 0:
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(future)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            return False
        return True
