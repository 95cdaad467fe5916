"""A failed poller run stays pending and is run again with backoff, without a new trigger."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import cast

import pytest

from common.messaging.amqp import DeadLetterer
from common.runs import RunRequest
from common.store import open_store
from services.runtime.triggers import RunCoordinator, RunStore
from tests.harness.waiting import until

from .conftest import Broker

pytestmark = pytest.mark.anyio


async def test_a_failed_run_is_retried_with_backoff(broker: Broker, url: str) -> None:
    attempts: list[float] = []
    covered: list[str] = []

    async def flaky(request: RunRequest) -> None:
        attempts.append(time.monotonic())
        if len(attempts) <= 3:
            raise RuntimeError("dataverse is down")
        covered.extend(request.covers)

    async with open_store(url) as store:
        coordinator = RunCoordinator(service="dynamics-poller", account=broker.account,
                                     store=store, publisher=broker.publisher, run_cycle=flaky,
                                     pending_poll_s=30, retry_base_s=0.4, retry_max_s=10)
        trigger = coordinator.consumer(connection=broker.connection,
                                       dead_letters=DeadLetterer(publisher=broker.publisher,
                                                                 service="test"))
        tasks = [asyncio.create_task(trigger.run()), asyncio.create_task(coordinator.run_loop())]
        try:
            await asyncio.wait_for(trigger.consuming.wait(), timeout=10)
            sent = await broker.trigger()
            await until(lambda: covered == [sent], timeout_s=30, every=0.02, what="the trigger covered")
            await asyncio.wait_for(coordinator.idle.wait(), timeout=30)
            assert await store.get_checkpoint(broker.account, "dynamics-poller:pending") == "[]"
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
    # One trigger, four runs: each wait at least half its backoff (0.4, 0.8, 1.6 s ceilings),
    # so the failures never make a hot loop; far below the 30 s pending poll.
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(attempts) == 4
    assert all(gap >= ceiling / 2 - 0.05 for gap, ceiling in zip(gaps, (0.4, 0.8, 1.6),
                                                                   strict=True)), gaps
    assert coordinator.failures == 0


class _StoreDown:
    """The ledger store, unreachable: every call fails as a refused connection would."""

    def __getattr__(self, name: str) -> object:
        async def refused(*args: object, **kwargs: object) -> None:
            raise ConnectionRefusedError(111, "Connect call failed")
        return refused


async def test_the_run_loop_backs_off_while_the_store_is_down(broker: Broker) -> None:
    async def never(request: RunRequest) -> None:
        raise AssertionError("no run without the store")

    coordinator = RunCoordinator(service="dynamics-poller", account=broker.account,
                                 store=cast(RunStore, _StoreDown()), publisher=broker.publisher,
                                 run_cycle=never,
                                 schedule="manual", pending_poll_s=30, retry_base_s=0.4,
                                 retry_max_s=10)
    began = time.monotonic()
    loop = asyncio.create_task(coordinator.run_loop())
    try:
        await until(lambda: coordinator.failures >= 4, timeout_s=30, every=0.02, what="four failed runs")
        # each failure waits at least half its backoff (0.4, 0.8, 1.6 s ceilings): no hot loop
        assert time.monotonic() - began >= 0.2 + 0.4 + 0.8 - 0.05
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    # thousands of failures in a row never overflow the backoff
    coordinator.failures = 5000
    assert coordinator._retry_delay() <= 10
