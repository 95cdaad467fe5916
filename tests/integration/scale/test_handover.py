"""Shard queues spread over replicas and move when one joins, leaves or dies; per-email order
holds throughout: what was handled to the end (and so acked) is each email's changes, once
each, in the order they were published, and no shard is ever handled by two replicas at once.

Replicas are in-process here (each with its own broker connection and store connection); a
"killed" replica loses both at once, mid-batch, without leaving the membership.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection

from common.messaging.amqp import DeadLetterer, Delivery, Outgoing, QueueConsumer
from common.messaging.envelope import Envelope, PreferenceChange, encode
from common.messaging.topology import CHANGES_EXCHANGE, Topology, shard_of
from common.store import LedgerStore, open_store
from services.runtime.assignment import ShardAssigner, group_name, holders
from tests.harness.waiting import until

from .conftest import BROKER_URL, Broker

pytestmark = pytest.mark.anyio

EMAILS = [f"person{i}@example.com" for i in range(16)]
PER_EMAIL = 25
TTL_S = 1.0


@dataclass
class Ledger:
    """What the replicas handled: per email, the sequence numbers of completed batches."""

    done: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    in_flight: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    overlaps: list[str] = field(default_factory=list)
    hang: dict[str, asyncio.Event] = field(default_factory=dict)
    hanging: set[str] = field(default_factory=set)

    def handler(self, replica: str) -> Callable[[Sequence[Delivery]], Awaitable[None]]:
        async def handle(batch: Sequence[Delivery]) -> None:
            queue = batch[0].queue
            busy = self.in_flight[queue]
            if busy:
                self.overlaps.append(f"{replica} and {busy} on {queue}")
            busy.add(replica)
            try:
                if replica in self.hang:
                    self.hanging.add(replica)
                    await self.hang[replica].wait()
                await asyncio.sleep(0.005)  # the batch's work takes a little time (not a wait)
                for delivery in batch:
                    for change in delivery.envelope.changes:
                        assert isinstance(change, PreferenceChange)
                        self.done[change.email].append(int(change.change_id))
            finally:
                busy.discard(replica)
        return handle

    @property
    def complete(self) -> bool:
        return sum(len(v) for v in self.done.values()) >= len(EMAILS) * PER_EMAIL


@dataclass
class Replica:
    name: str
    connection: AbstractRobustConnection
    store: LedgerStore
    assigner: ShardAssigner
    task: asyncio.Task[None]


@asynccontextmanager
async def replicas(broker: Broker, url: str, ledger: Ledger) -> AsyncIterator[
        Callable[[str], asyncio.Future[Replica]]]:
    running: list[Replica] = []

    async def start(name: str) -> Replica:
        connection = await aio_pika.connect_robust(BROKER_URL)
        store = open_store(url)
        await store.open()
        assigner = ShardAssigner(service="reconciler", store=store, member=name,
                                 heartbeat_s=0.2, ttl_s=TTL_S)
        dead = DeadLetterer(publisher=broker.publisher, service=name)
        def consumer(queue: str) -> QueueConsumer:
            return QueueConsumer(connection=connection, queue=queue, account=broker.account,
                                 handler=ledger.handler(name), dead_letters=dead, prefetch=20,
                                 batch_size=5)

        for shard in range(broker.topology.shards):
            queue = Topology.changes_queue(broker.account, shard)
            assigner.add(account=broker.account, queue=queue, make=partial(consumer, queue))
        replica = Replica(name=name, connection=connection, store=store, assigner=assigner,
                          task=asyncio.create_task(assigner.run()))
        running.append(replica)
        await asyncio.wait_for(assigner.settled.wait(), timeout=30)
        return replica

    try:
        yield lambda name: asyncio.ensure_future(start(name))
    finally:
        for replica in running:
            replica.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await replica.task
            with contextlib.suppress(Exception):
                await replica.connection.close()
            with contextlib.suppress(Exception):
                await replica.store.close()


async def publish_all(broker: Broker) -> None:
    """Every email's changes 0..PER_EMAIL-1, in order, interleaved, a few at a time."""
    now = datetime.now(UTC)
    for seq in range(PER_EMAIL):
        batch = []
        for email in EMAILS:
            envelope = Envelope(type="preference-changes", account=broker.account,
                                source="dynamics", change_id=f"{email}:{seq}", origin_time=now,
                                changes=(PreferenceChange(email=email, preference_id=1,
                                                          opted_in=bool(seq % 2), origin_time=now,
                                                          change_id=str(seq)),))
            batch.append(Outgoing(
                exchange=CHANGES_EXCHANGE,
                routing_key=Topology.changes_key(broker.account, shard_of(email, 4)),
                body=encode(envelope), message_id=envelope.change_id))
        await broker.publisher.publish_many(batch)
        # deliberate pacing: the changes keep arriving while replicas join and die (not a wait)
        await asyncio.sleep(0.04)


async def held(store: LedgerStore, account: str) -> dict[str, str]:
    """Queue -> the replica that reports consuming it."""
    return holders(await store.members(group_name("reconciler", account)))


async def test_shards_spread_move_and_keep_per_email_order(broker: Broker, url: str) -> None:
    ledger = Ledger()
    queues = {Topology.changes_queue(broker.account, s) for s in range(4)}
    async with replicas(broker, url, ledger) as start:
        r1 = await start("r1")
        publishing = asyncio.create_task(publish_all(broker))

        async def spread(names: set[str]) -> bool:
            owners = await held(r1.store, broker.account)
            return set(owners) == queues and set(owners.values()) == names

        await until(lambda: spread({"r1"}), timeout_s=30, every=0.02, what="r1 holding every queue")
        r2 = await start("r2")
        await until(lambda: spread({"r1", "r2"}), timeout_s=30, every=0.02,
                    what="the queues spread over r1 and r2")
        await start("r3")
        await until(lambda: spread({"r1", "r2", "r3"}), timeout_s=30, every=0.02,
                    what="the queues spread over r1, r2 and r3")

        # r2 hangs in the middle of a batch, and dies there
        ledger.hang["r2"] = asyncio.Event()
        await until(lambda: "r2" in ledger.hanging, timeout_s=30, every=0.02, what="r2 hanging in a batch")
        r2_queues = {q for q, m in (await held(r1.store, broker.account)).items() if m == "r2"}
        killed_at = time.monotonic()
        await r2.connection.close()
        await r2.store.close()
        r2.task.cancel()
        await until(lambda: spread({"r1", "r3"}), timeout_s=30, every=0.02,
                    what="r2's queues handed over to r1 and r3")
        handed_over_s = time.monotonic() - killed_at
        await publishing
        await until(lambda: ledger.complete, timeout_s=30, every=0.02, what="every change handled")

    assert not ledger.overlaps
    for email in EMAILS:
        assert ledger.done[email] == list(range(PER_EMAIL)), email
    assert r2_queues
    print(f"shards of the killed replica handed over in {handed_over_s:.1f} s "
          f"(membership TTL {TTL_S} s)")
