"""One suite for the broker seam (:mod:`common.messaging.abc`), run against the in-memory
broker and against RabbitMQ (127.0.0.1:5672; that half is skipped when no broker answers):
confirmed publishing and returns, routing, the consumer's acks, dead letters and redelivery
are the same through both."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest

from common.messaging.abc import REASON, Delivery, Outgoing, Publisher, Transport, Unroutable
from common.messaging.amqp import AmqpPublisher, BrokerUnavailable, DeadLetterer, QueueConsumer, connect
from common.messaging.breakers import Breakers, RetryPolicy
from common.messaging.envelope import Envelope, PreferenceChange, encode
from common.messaging.memory import MemoryBroker
from common.messaging.resilience import TransientFailure
from common.messaging.topology import CHANGES_EXCHANGE, CONTROL_EXCHANGE, Topology

pytestmark = pytest.mark.anyio
BROKER_URL = os.environ.get("PREFSYNC_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
FAST = RetryPolicy(base_s=0.01, cap_s=0.05, hold_s=0.5, unknown_attempts=2)


@dataclass
class Seam:
    """One broker behind the seam: how to publish, consume, and look into a queue."""

    name: str
    account: str
    publisher: Publisher
    transport: Transport | aio_pika.abc.AbstractRobustConnection
    returned: type[Exception]
    take: object  # async (queue, count) -> list of (message id, headers, body)
    consumers: list[asyncio.Task[None]] = field(default_factory=list)

    def consumer(self, handler: object, *, queue: str | None = None,
                 batch_size: int | Callable[[], int] = 10, prefetch: int = 20,
                 batch_bytes: int | None = None,
                 kind: type[QueueConsumer] = QueueConsumer) -> QueueConsumer:
        consumer = kind(
            connection=self.transport, queue=queue or Topology.changes_queue(self.account, 0),
            account=self.account, handler=handler,  # type: ignore[arg-type]
            dead_letters=DeadLetterer(publisher=self.publisher, service="test"),
            prefetch=prefetch, batch_size=batch_size, batch_bytes=batch_bytes, retry=FAST,
            breakers=Breakers())
        self.consumers.append(asyncio.create_task(consumer.run()))
        return consumer

    async def dead_letters(self, count: int) -> dict[str, dict[str, object]]:
        taken = await self.take(Topology.dead_letter_queue(self.account), count)  # type: ignore[operator]
        return {message_id: headers for message_id, headers, _ in taken}


async def _memory(account: str, stack: AsyncExitStack) -> Seam:
    broker = MemoryBroker(Topology(accounts=[account], shards=2))

    async def take(queue: str, count: int) -> list[tuple[str, dict[str, object], bytes]]:
        async with asyncio.timeout(10):
            while len(broker.ready(queue)) < count:
                await broker.changed()
        return [(o.message_id, dict(o.headers), o.body) for o in broker.take(queue)]

    return Seam(name="memory", account=account, publisher=broker, transport=broker,
                returned=Unroutable, take=take)


async def _rabbitmq(account: str, stack: AsyncExitStack) -> Seam:
    try:
        connection = await connect(BROKER_URL, name="contract")
    except BrokerUnavailable:
        pytest.skip("no RabbitMQ at 127.0.0.1:5672")
    await stack.enter_async_context(connection)
    topology = Topology(accounts=[account], shards=2)
    channel = await connection.channel()
    await topology.declare(channel)

    async def delete() -> None:
        cleanup = await connection.channel()
        for queue in topology.queues:
            await cleanup.queue_delete(queue.name)

    stack.push_async_callback(delete)
    publisher = await AmqpPublisher.open(connection)

    async def take(queue: str, count: int) -> list[tuple[str, dict[str, object], bytes]]:
        found = await channel.get_queue(queue)
        out: list[tuple[str, dict[str, object], bytes]] = []
        async with asyncio.timeout(10), found.iterator() as messages:
            async for message in messages:
                await message.ack()
                out.append((message.message_id or "", dict(message.headers or {}),
                            message.body))
                if len(out) >= count:
                    break
        return out

    return Seam(name="rabbitmq", account=account, publisher=publisher, transport=connection,
                returned=aio_pika.exceptions.DeliveryError, take=take)


@pytest.fixture(params=["memory", "rabbitmq"])
async def seam(request: pytest.FixtureRequest) -> AsyncIterator[Seam]:
    account = f"c{uuid.uuid4().hex[:10]}"
    async with AsyncExitStack() as stack:
        make = _memory if request.param == "memory" else _rabbitmq
        found = await make(account, stack)

        async def stop_consumers() -> None:
            for task in found.consumers:
                task.cancel()
            if found.consumers:
                await asyncio.wait(found.consumers)

        stack.push_async_callback(stop_consumers)
        yield found


def change(account: str, n: int, *, shard: int = 0) -> Outgoing:
    envelope = Envelope(type="preference-changes", account=account, source="dynamics",
                        change_id=f"c{n}", origin_time=T0,
                        changes=(PreferenceChange(email=f"p{n}@example.com", preference_id=1,
                                                  opted_in=True, origin_time=T0),))
    return Outgoing(exchange=CHANGES_EXCHANGE, routing_key=Topology.changes_key(account, shard),
                    body=encode(envelope), message_id=f"m{n}")


class Seen:
    """What a handler was given, and an event once it has seen ``count`` messages."""

    def __init__(self, count: int) -> None:
        self.ids: list[str] = []
        self.deliveries: list[Delivery] = []
        self._count = count
        self.done = asyncio.Event()

    def add(self, batch: Sequence[Delivery]) -> None:
        self.ids += [d.envelope.change_id for d in batch]
        self.deliveries += batch
        if len(self.ids) >= self._count:
            self.done.set()

    async def wait(self) -> None:
        async with asyncio.timeout(10):
            await self.done.wait()


async def test_published_messages_are_handled_in_order_with_typed_fields(seam: Seam) -> None:
    await seam.publisher.publish_many([change(seam.account, n) for n in range(12)])
    seen = Seen(12)

    async def handle(batch: Sequence[Delivery]) -> None:
        seen.add(batch)

    seam.consumer(handle, batch_size=5)
    await seen.wait()
    assert seen.ids == [f"c{n}" for n in range(12)]
    first = seen.deliveries[0]
    assert (first.message_id, first.shard, first.redelivered, first.delivery_count) == (
        "m0", 0, False, 0)
    assert first.queue == Topology.changes_queue(seam.account, 0)


async def test_a_batch_is_at_most_the_size_said_when_it_is_taken(seam: Seam) -> None:
    """A consumer's batch size may change while it runs (a writer's, with its share of the
    shards): each batch is taken at the size said then."""
    await seam.publisher.publish_many([change(seam.account, n) for n in range(12)])
    seen = Seen(12)
    said: list[int] = []

    def batch_size() -> int:
        said.append(len(said) % 3 + 1)  # 1, 2, 3, 1, 2, 3, ...
        return said[-1]

    sizes: list[int] = []

    async def handle(batch: Sequence[Delivery]) -> None:
        sizes.append(len(batch))
        seen.add(batch)

    seam.consumer(handle, batch_size=batch_size)
    await seen.wait()
    assert seen.ids == [f"c{n}" for n in range(12)]
    assert all(size <= limit for size, limit in zip(sizes, said, strict=False)), (sizes, said)
    assert len(said) >= len(sizes) >= 12 // 3


class AllAtOnce(QueueConsumer):
    """A consumer whose first ``ARRIVING`` messages reach its inbox together, so that its
    batches are made from all of them; later ones (redeliveries) come as they arrive."""

    ARRIVING = 5

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._arrived: list[Any] | None = []

    async def _receive(self, message: Any) -> None:
        if self._arrived is None:
            await super()._receive(message)
            return
        self._arrived.append(message)
        if len(self._arrived) == self.ARRIVING:
            arrived, self._arrived = self._arrived, None
            for each in arrived:
                await super()._receive(each)


async def test_a_batch_stays_within_its_bytes_and_the_message_past_them_starts_the_next(
        seam: Seam) -> None:
    messages = [change(seam.account, n) for n in range(AllAtOnce.ARRIVING)]
    size = len(messages[0].body)
    assert all(len(m.body) == size for m in messages)
    await seam.publisher.publish_many(messages)
    seen = Seen(AllAtOnce.ARRIVING)
    sizes: list[int] = []

    async def handle(batch: Sequence[Delivery]) -> None:
        sizes.append(len(batch))
        seen.add(batch)

    seam.consumer(handle, batch_size=10, batch_bytes=size * 5 // 2, kind=AllAtOnce)
    await seen.wait()
    assert seen.ids == [f"c{n}" for n in range(AllAtOnce.ARRIVING)]
    assert sizes == [2, 2, 1]


async def test_a_message_bigger_than_a_batchs_bytes_goes_alone(seam: Seam) -> None:
    await seam.publisher.publish_many([change(seam.account, n)
                                       for n in range(AllAtOnce.ARRIVING)])
    seen = Seen(AllAtOnce.ARRIVING)
    sizes: list[int] = []

    async def handle(batch: Sequence[Delivery]) -> None:
        sizes.append(len(batch))
        seen.add(batch)

    seam.consumer(handle, batch_size=10, batch_bytes=1, kind=AllAtOnce)
    await seen.wait()
    assert seen.ids == [f"c{n}" for n in range(AllAtOnce.ARRIVING)]
    assert sizes == [1] * AllAtOnce.ARRIVING


async def test_a_batch_given_back_returns_the_message_carried_past_it_in_order(
        seam: Seam) -> None:
    messages = [change(seam.account, n) for n in range(AllAtOnce.ARRIVING)]
    await seam.publisher.publish_many(messages)
    calls: list[list[str]] = []
    seen = Seen(AllAtOnce.ARRIVING)

    async def handle(batch: Sequence[Delivery]) -> None:
        calls.append([d.envelope.change_id for d in batch])
        if not batch[0].redelivered:
            raise TransientFailure("the store is down", dependency="store")  # until the hold
        seen.add(batch)

    seam.consumer(handle, batch_size=10, batch_bytes=len(messages[0].body) * 5 // 2,
                  kind=AllAtOnce)
    await seen.wait()
    # the first batch (c0, c1) held past its hold went back with c2 (carried) and the rest
    assert calls[0] == ["c0", "c1"]
    assert seen.ids == [f"c{n}" for n in range(AllAtOnce.ARRIVING)]
    assert all(d.redelivered for d in seen.deliveries)


async def test_a_mandatory_message_without_a_route_is_returned(seam: Seam) -> None:
    with pytest.raises(seam.returned):
        await seam.publisher.publish_many([change(seam.account, 1, shard=99)])


async def test_an_advisory_message_without_a_route_is_dropped(seam: Seam) -> None:
    await seam.publisher.publish_many([Outgoing(
        exchange=CONTROL_EXCHANGE, routing_key=f"{seam.account}.progress.none", body=b"{}",
        message_id="p", mandatory=False)])


async def test_a_malformed_message_is_dead_lettered_and_its_neighbours_handled(
        seam: Seam) -> None:
    bad = Outgoing(exchange=CHANGES_EXCHANGE, routing_key=Topology.changes_key(seam.account, 0),
                   body=b'{"v": 99}', message_id="bad")
    await seam.publisher.publish_many([change(seam.account, 1), bad, change(seam.account, 2)])
    seen = Seen(2)

    async def handle(batch: Sequence[Delivery]) -> None:
        seen.add(batch)

    seam.consumer(handle)
    await seen.wait()
    assert seen.ids == ["c1", "c2"]
    dead = await seam.dead_letters(1)
    assert "unknown schema version 99" in str(dead["bad"][REASON])


async def test_the_message_a_handler_fails_on_is_isolated_and_dead_lettered(
        seam: Seam) -> None:
    await seam.publisher.publish_many([change(seam.account, n) for n in range(6)])
    seen = Seen(5)

    async def handle(batch: Sequence[Delivery]) -> None:
        if any(d.envelope.change_id == "c3" for d in batch):
            raise ValueError("cannot handle c3")
        seen.add(batch)

    seam.consumer(handle, batch_size=6)
    await seen.wait()
    assert sorted(seen.ids) == ["c0", "c1", "c2", "c4", "c5"]
    dead = await seam.dead_letters(1)
    assert "cannot handle c3" in str(dead["m3"][REASON])
    assert dead["m3"]["x-prefsync-kind"] == "failed"


async def test_a_batch_held_past_its_hold_is_given_back_and_redelivered(seam: Seam) -> None:
    await seam.publisher.publish_many([change(seam.account, n) for n in range(3)])
    calls: list[tuple[str, bool]] = []
    seen = Seen(3)

    async def handle(batch: Sequence[Delivery]) -> None:
        calls.extend((d.envelope.change_id, d.redelivered) for d in batch)
        if not batch[0].redelivered:
            raise TransientFailure("the store is down", dependency="store")  # retried in place
        seen.add(batch)

    seam.consumer(handle)
    await seen.wait()
    assert seen.ids == ["c0", "c1", "c2"]
    assert ("c0", False) in calls and ("c0", True) in calls
    assert all(d.redelivered and d.delivery_count == 1 for d in seen.deliveries)


async def test_a_consumer_that_stops_hands_its_messages_to_the_next_in_order(
        seam: Seam) -> None:
    await seam.publisher.publish_many([change(seam.account, n) for n in range(4)])
    first_got = asyncio.Event()
    release = asyncio.Event()

    async def slow(batch: Sequence[Delivery]) -> None:
        first_got.set()
        await release.wait()

    first = seam.consumer(slow, batch_size=1, prefetch=4)
    async with asyncio.timeout(10):
        await first_got.wait()
    first.stop()
    release.set()
    seen = Seen(3)

    async def handle(batch: Sequence[Delivery]) -> None:
        seen.add(batch)

    seam.consumer(handle)
    await seen.wait()
    assert seen.ids == ["c1", "c2", "c3"]
