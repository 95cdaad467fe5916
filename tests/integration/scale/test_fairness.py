"""Fairness: one account's backlog never holds up another account.

Account A's dynamics-poller has just read a large backfill (published straight to A's changes
queues here); account B's one change is applied while A's backlog is still queued. The issue's
figure is 200,000 changes for A. Rather than hoping a fixed backlog outlasts B's sync (it did
not, once the reconciler got fast), the test keeps A's changes queues from running dry: it
publishes more of A's backfill whenever their ready messages run low, until B's sync is done,
and asserts that they never ran dry meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import pytest

from common.domain import PreferenceKey
from common.messaging.amqp import AmqpPublisher
from common.messaging.envelope import PreferenceChange
from common.messaging.publishing import CHUNK, envelopes_by_shard
from common.store import open_store
from tests.harness.queues import declared, service_queues

from ..pipeline.conftest import BROKER_URL, World, make_worlds

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

BACKLOG = int(os.environ.get("PREFSYNC_FAIRNESS_BACKLOG", "60000"))  # A's first backfill
TOP_UP = 10_000  # changes published each time A's queues run low
# ready messages below which more is published: 30,000 changes, about a second of the
# reconciler's work, several times what publishing a top-up takes
LOW_WATER = 30_000 // CHUNK


def backfill_keys(world: World, count: int) -> list[PreferenceKey]:
    return [PreferenceKey(account=world.account, email=f"backfill{i}@example.com",
                          preference_id=world.preferences[i % len(world.preferences)].id)
            for i in range(count)]


async def reconciled(world: World, keys: list[PreferenceKey]) -> int:
    """How many of the backfill's keys the reconciler has committed to the ledger."""
    async with open_store(world.config.store.url) as store:
        return len(await store.load(keys))


async def publish_backfill(world: World, publisher: AmqpPublisher, *, start: int,
                           count: int) -> None:
    now = datetime.now(UTC)
    changes = [PreferenceChange(email=f"backfill{i}@example.com",
                                preference_id=world.preferences[i % len(world.preferences)].id,
                                opted_in=bool(i % 2), origin_time=now, version=i + 1,
                                change_id=f"backfill:{i}")
               for i in range(start, start + count)]
    await publisher.publish_many(envelopes_by_shard(
        account=world.account, source="dynamics", type="preference-changes", changes=changes,
        shards=world.config.broker.shards, run_id=None, id_seed=f"backfill-{start}"))


class Backlog:
    """Keeps A's changes queues from running dry: publishes another chunk of A's backfill
    whenever their ready messages fall below ``LOW_WATER``, and notes the fewest ready seen."""

    def __init__(self, world: World, connection: aio_pika.abc.AbstractConnection,
                 publisher: AmqpPublisher) -> None:
        self.world, self.connection, self.publisher = world, connection, publisher
        self.queues = service_queues(world.account, "reconciler",
                                     shards=world.config.broker.shards)
        self.published = 0
        self.fewest_ready: int | None = None
        self.stop = asyncio.Event()

    async def ready(self) -> int:
        return sum(ready for ready, _ in await declared(self.connection, self.queues))

    async def top_up(self, count: int) -> None:
        await publish_backfill(self.world, self.publisher, start=self.published, count=count)
        self.published += count

    async def keep(self) -> None:
        while not self.stop.is_set():
            ready = await self.ready()
            self.fewest_ready = ready if self.fewest_ready is None else min(self.fewest_ready,
                                                                             ready)
            if ready < LOW_WATER:
                await self.top_up(TOP_UP)
            else:  # paced by the stop event: the queues' depth has no event of its own
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 0.05)


async def test_a_backlog_of_one_account_does_not_delay_another(tmp_path: Path) -> None:
    async with make_worlds(tmp_path, accounts=2) as (a, b):
        await a.start()               # every service, both accounts, one process
        first = await b.sync()
        assert first["failed"] == 0, first
        connection = await aio_pika.connect_robust(BROKER_URL)
        async with connection:
            backlog = Backlog(a, connection, await AmqpPublisher.open(connection))
            await backlog.top_up(BACKLOG)
            person, preference = b.people[4], b.preferences[0]
            _, before = await b.values(person.email, preference.id)
            wanted = not before if before is not None else True
            await b.edit_dynamics(person.email, preference.id, wanted)
            keeping = asyncio.create_task(backlog.keep())
            started = asyncio.get_running_loop().time()
            try:
                summary = await b.sync()
            finally:
                backlog.stop.set()
                await keeping
            took = asyncio.get_running_loop().time() - started
        done = await reconciled(a, backfill_keys(a, backlog.published))
        assert summary["failed"] == 0 and summary["applied_to_dotdigital"] >= 1, summary
        assert await b.values(person.email, preference.id) == ({wanted}, wanted)
        # B's change went through while A's backlog stayed queued the whole time
        assert backlog.fewest_ready is not None and backlog.fewest_ready > 0, \
            "A's changes queues ran dry before B's change was applied"
        assert done < backlog.published, "all of A's backfill was reconciled by then"
        print(f"B's change applied in {took:.1f} s, while {done} of A's {backlog.published} "
              f"changes were reconciled (A's queues never below {backlog.fewest_ready} ready)")
