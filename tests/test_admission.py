"""The admission gate under churn: thousands of random cancellations leak no slot and no place."""

from __future__ import annotations

import random

import anyio
import pytest

from supervisor.admission import AdmissionGate, AdmissionRefused
from supervisor.policy import (
    Lifecycle,
    LifecycleState,
    Reason,
    ResourceLimits,
    ResourceObservation,
    create_lifecycle_state,
)

pytestmark = pytest.mark.anyio


def gate(
    max_in_flight: int = 4,
    queue_bound: int = 16,
    queue_timeout_s: float = 30.0,
    lifecycle: Lifecycle | None = None,
) -> AdmissionGate:
    state = {"lifecycle": lifecycle or create_lifecycle_state(LifecycleState.READY)}
    g = AdmissionGate(
        max_in_flight=max_in_flight,
        queue_bound=queue_bound,
        queue_timeout_s=queue_timeout_s,
        lifecycle=lambda: state["lifecycle"],
    )
    g.test_state = state  # type: ignore[attr-defined]
    return g


async def test_thousands_of_random_cancellations_leak_nothing() -> None:
    g = gate(max_in_flight=4, queue_bound=16)
    rng = random.Random(1234)
    outcomes = {"served": 0, "refused": 0, "cancelled": 0}
    release = {"event": anyio.Event()}
    reasons: set[Reason] = set()

    async def client(scope: anyio.CancelScope) -> None:
        with scope:
            try:
                await g.acquire()
            except AdmissionRefused as refused:
                outcomes["refused"] += 1
                reasons.add(refused.reason)
                return
            try:
                assert g.in_flight <= 4
                assert g.queued <= 16
                await release["event"].wait()  # hold the slot until the controller says
                outcomes["served"] += 1
            finally:
                g.release()
        if scope.cancelled_caught:
            outcomes["cancelled"] += 1

    async def settle() -> None:
        for _ in range(5):
            await anyio.sleep(0)

    total = 0
    async with anyio.create_task_group() as tg:
        for _ in range(600):
            scopes = [anyio.CancelScope() for _ in range(rng.randrange(8, 24))]
            for scope in scopes:
                tg.start_soon(client, scope)
            total += len(scopes)
            await settle()  # some hold slots, some wait in the queue, the rest were refused
            for scope in rng.sample(scopes, k=int(len(scopes) * 0.6)):
                scope.cancel()  # waiting, holding a slot, or already refused: all must be safe
            await settle()
            release["event"].set()  # let this round's holders finish
            release["event"] = anyio.Event()
            await settle()
        release["event"].set()
    assert sum(outcomes.values()) == total
    assert reasons == {Reason.QUEUE_FULL}
    assert outcomes["cancelled"] >= 1000
    assert outcomes["served"] >= 200
    assert outcomes["refused"] >= 100
    assert g.in_flight == 0
    assert g.queued == 0
    assert g.peak_in_flight == 4
    assert g.peak_queued == 16
    # The gate works normally afterwards.
    await g.acquire()
    assert g.in_flight == 1
    g.release()


async def test_fifo_handoff_and_no_barging() -> None:
    g = gate(max_in_flight=1, queue_bound=5)
    await g.acquire()
    order: list[int] = []

    async def waiter(n: int) -> None:
        await g.acquire()
        order.append(n)
        g.release()

    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(waiter, n)
            await anyio.wait_all_tasks_blocked()
        assert g.queued == 4
        # A newcomer may not take a slot ahead of the queue, even at the moment one frees.
        assert g.try_acquire().reason == Reason.AT_CAPACITY
        g.release()
    assert order == [0, 1, 2, 3]
    assert (g.in_flight, g.queued) == (0, 0)


async def test_queue_full_and_timeout() -> None:
    g = gate(max_in_flight=1, queue_bound=1, queue_timeout_s=0.05)
    await g.acquire()
    results: list[Reason] = []

    async def waiter() -> None:
        try:
            await g.acquire()
        except AdmissionRefused as refused:
            results.append(refused.reason)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(AdmissionRefused) as full:
            await g.acquire()
        assert full.value.reason == Reason.QUEUE_FULL
    assert results == [Reason.QUEUE_TIMEOUT]
    assert (g.in_flight, g.queued) == (1, 0)
    g.release()


async def test_waiters_are_refused_when_draining() -> None:
    g = gate(max_in_flight=1, queue_bound=4)
    await g.acquire()
    results: list[Reason] = []

    async def waiter() -> None:
        try:
            await g.acquire()
            g.release()
        except AdmissionRefused as refused:
            results.append(refused.reason)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        g.test_state["lifecycle"] = create_lifecycle_state(LifecycleState.DRAINING)  # type: ignore[attr-defined]
        g.release()  # the freed slot is not handed on: the gate is draining
    assert results == [Reason.DRAINING] * 3
    assert (g.in_flight, g.queued) == (0, 0)
    assert g.try_acquire().reason == Reason.DRAINING


async def test_resource_verdict_refuses_before_admission() -> None:
    g = AdmissionGate(
        max_in_flight=2,
        queue_bound=2,
        queue_timeout_s=1.0,
        lifecycle=lambda: create_lifecycle_state(LifecycleState.READY),
        observation=lambda: ResourceObservation(ram_bytes=200),
        limits=lambda: ResourceLimits(max_ram_bytes=100),
    )
    with pytest.raises(AdmissionRefused) as info:
        await g.acquire()
    assert info.value.reason == Reason.RAM_OVER_LIMIT
    assert g.in_flight == 0


async def test_wait_idle_for_drains() -> None:
    g = gate(max_in_flight=2)
    await g.acquire()
    assert await g.wait_idle(0.01) is False
    async with anyio.create_task_group() as tg:

        async def later() -> None:
            await anyio.sleep(0.02)
            g.release()

        tg.start_soon(later)
        assert await g.wait_idle(5) is True
