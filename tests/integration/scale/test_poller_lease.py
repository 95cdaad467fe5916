"""Poller replicas: one account is polled by one replica at a time, and no trigger is lost.

Two run coordinators of the same account and poller stand for two replicas: each has its own
store connection and consumes the trigger queue (single active consumer), as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from common.messaging.amqp import DeadLetterer
from common.runs import RunRequest
from common.store import LedgerStore, open_store
from services.runtime.triggers import RunCoordinator
from tests.harness.waiting import until

from .conftest import Broker

pytestmark = pytest.mark.anyio


@dataclass
class Runs:
    """Every run cycle, as (replica, start, end) on one clock, and what each covered."""

    intervals: list[tuple[str, float, float]] = field(default_factory=list)
    covered: list[str] = field(default_factory=list)
    active: set[str] = field(default_factory=set)
    overlapped: bool = False

    def cycle(self, replica: str, *, seconds: float,
              hang: asyncio.Event | None = None) -> Callable[[RunRequest], Awaitable[None]]:
        async def run(request: RunRequest) -> None:
            if self.active:
                self.overlapped = True
            self.active.add(replica)
            started = time.monotonic()
            try:
                if hang is not None:
                    await hang.wait()
                await asyncio.sleep(seconds)  # the run's work takes this long (not a wait)
                self.covered += request.covers
            finally:
                self.active.discard(replica)
                self.intervals.append((replica, started, time.monotonic()))
        return run


@asynccontextmanager
async def replica(broker: Broker, url: str, name: str,
                  run_cycle: Callable[[RunRequest], Awaitable[None]], *,
                  lease_ttl_s: float = 2.0, lease_renew_s: float = 0.3,
                  wrap: Callable[[LedgerStore], Any] = lambda store: store
                  ) -> AsyncIterator[tuple[RunCoordinator, LedgerStore, asyncio.Task[None]]]:
    store = open_store(url)
    await store.open()
    coordinator = RunCoordinator(service="dynamics-poller", account=broker.account,
                                 store=wrap(store),
                                 publisher=broker.publisher, run_cycle=run_cycle, holder=name,
                                 lease_ttl_s=lease_ttl_s, lease_renew_s=lease_renew_s,
                                 pending_poll_s=0.1)
    dead = DeadLetterer(publisher=broker.publisher, service=name)
    trigger = coordinator.consumer(connection=broker.connection, dead_letters=dead)

    async def both() -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(trigger.run())
            group.create_task(coordinator.run_loop())

    task = asyncio.create_task(both())
    try:
        await asyncio.wait_for(trigger.consuming.wait(), timeout=10)
        yield coordinator, store, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await store.close()


async def test_two_replicas_never_run_one_account_at_once(broker: Broker, url: str) -> None:
    runs = Runs()
    sent: list[str] = []
    async with replica(broker, url, "r2", runs.cycle("r2", seconds=0.15)):
        async with replica(broker, url, "r1", runs.cycle("r1", seconds=0.15)):
            for _ in range(6):  # deliberate pacing: triggers arrive during runs (not a wait)
                sent.append(await broker.trigger())
                await asyncio.sleep(0.05)
            await until(lambda: len(runs.intervals) >= 2, timeout_s=30, every=0.02, what="two runs")
        # r1 stops (its trigger consumer too); r2 carries on with what is pending and new
        for _ in range(6):  # paced as above
            sent.append(await broker.trigger())
            await asyncio.sleep(0.05)
        await until(lambda: set(sent) <= set(runs.covered), timeout_s=30, every=0.02,
                    what="every trigger covered by a run")
    assert not runs.overlapped
    spans = sorted((start, end) for _, start, end in runs.intervals)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
    assert "r2" in {name for name, _, _ in runs.intervals}


async def test_a_run_left_by_a_dead_replica_is_taken_over(broker: Broker, url: str) -> None:
    runs = Runs()
    hang = asyncio.Event()
    async with replica(broker, url, "r1", runs.cycle("r1", seconds=0, hang=hang),
                       lease_ttl_s=1.0) as (_, r1_store, r1_task):
        sent = await broker.trigger()
        await until(lambda: "r1" in runs.active, timeout_s=30, every=0.02, what="r1 running")
        # r1 dies mid-run: its store goes away first, so it can neither renew nor release
        await r1_store.close()
        r1_task.cancel()
        async with replica(broker, url, "r2", runs.cycle("r2", seconds=0)) as (r2, _, _):
            await until(lambda: sent in runs.covered, timeout_s=30, every=0.02, what="the trigger covered")
            assert [name for name, _, _ in runs.intervals if name == "r2"]
            await asyncio.wait_for(r2.idle.wait(), timeout=30)


async def test_a_stalled_replica_loses_the_lease_and_stops(broker: Broker, url: str) -> None:
    runs = Runs()
    stall = asyncio.Event()
    # r1 renews every 2 s but its lease lasts 0.5 s: r2 takes over while r1 is stalled
    async with replica(broker, url, "r1", runs.cycle("r1", seconds=0, hang=stall),
                       lease_ttl_s=0.5, lease_renew_s=2.0):
        sent = await broker.trigger()
        await until(lambda: "r1" in runs.active, timeout_s=30, every=0.02, what="r1 running")
        async with replica(broker, url, "r2", runs.cycle("r2", seconds=0)) as (r2, store, _):
            await until(lambda: sent in runs.covered, timeout_s=30, every=0.02, what="the trigger covered")
            # r1's run was cancelled, not finished
            await until(lambda: not runs.active, timeout_s=30, every=0.02, what="no run under way")
            assert [name for name, _, _ in runs.intervals] == ["r2", "r1"]
            assert runs.covered == [sent]               # once, by r2
            await asyncio.wait_for(r2.idle.wait(), timeout=30)
            assert await store.get_checkpoint(broker.account, "dynamics-poller:pending") == "[]"


class HeldRelease:
    """A replica's store whose lease release waits for the test's word (and says it began)."""

    def __init__(self, store: LedgerStore) -> None:
        self._store = store
        self.releasing = asyncio.Event()
        self.go_on = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def release_lease(self, name: str, holder: str) -> None:
        self.releasing.set()
        await self.go_on.wait()
        await self._store.release_lease(name, holder)


async def test_a_replica_stopped_while_it_releases_the_lease_ends_once_it_is_released(
        broker: Broker, url: str) -> None:
    runs = Runs()
    held: list[HeldRelease] = []

    def hold(store: LedgerStore) -> Any:
        held.append(HeldRelease(store))
        return held[-1]

    async with replica(broker, url, "r1", runs.cycle("r1", seconds=0), wrap=hold
                       ) as (r1, store, task):
        sent = await broker.trigger()
        # the run ends; the replica is stopped while it releases the lease
        await asyncio.wait_for(held[0].releasing.wait(), timeout=30)
        assert runs.covered == [sent]
        task.cancel()
        # a stopped replica ends at once but for the release: it waits for that (with the
        # release held, it cannot end; the bound only keeps a wrong replica from passing)
        ended, _ = await asyncio.wait({task}, timeout=0.5)
        assert not ended
        held[0].go_on.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # released before the task ended (not left to go on alone, and fail, once the
        # replica's store is closed), so the next replica need not wait out the lease
        assert await store.lease_holder(r1.lease) is None
