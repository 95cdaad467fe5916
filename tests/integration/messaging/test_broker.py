"""The transport against a real RabbitMQ: confirms, returns, ordering, dead letters."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

import aio_pika
import anyio
import pytest

from common.messaging.amqp import (
    AmqpPublisher,
    DeadLetterer,
    Delivery,
    Outgoing,
    QueueConsumer,
    broker_lost,
    connect,
    while_broker_returns,
)
from common.messaging.breakers import RetryPolicy
from common.messaging.envelope import Envelope, PreferenceChange, encode
from common.messaging.topology import CHANGES_EXCHANGE, Topology

from .conftest import BROKER_URL

pytestmark = pytest.mark.anyio
T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def change_message(account: str, n: int, *, claimed_account: str | None = None) -> Outgoing:
    env = Envelope(type="preference-changes", account=claimed_account or account,
                   source="dynamics", change_id=f"c{n}", origin_time=T0,
                   changes=(PreferenceChange(email=f"p{n}@example.com", preference_id=1,
                                             opted_in=True, origin_time=T0),))
    return Outgoing(exchange=CHANGES_EXCHANGE, routing_key=Topology.changes_key(account, 0),
                    body=encode(env), message_id=f"m{n}")


async def test_unroutable_publish_fails(topology: Topology, account: str) -> None:
    connection = await connect(BROKER_URL, name="test")
    async with connection:
        publisher = await AmqpPublisher.open(connection)
        with pytest.raises(aio_pika.exceptions.DeliveryError):
            await publisher.publish_many([Outgoing(
                exchange=CHANGES_EXCHANGE, routing_key=f"{account}.changes.99",
                body=b"{}", message_id="x")])


async def test_consumer_in_order_and_dead_letters_bad_messages(topology: Topology,
                                                               account: str) -> None:
    connection = await connect(BROKER_URL, name="test")
    async with connection:
        publisher = await AmqpPublisher.open(connection)
        good = [change_message(account, n) for n in range(20)]
        malformed = Outgoing(exchange=CHANGES_EXCHANGE, routing_key=Topology.changes_key(account, 0),
                             body=b'{"v": 99}', message_id="bad")
        forged = change_message(account, 99, claimed_account="someone-else")
        await publisher.publish_many([*good[:10], malformed, forged, *good[10:]])

        seen: list[str] = []
        done = anyio.Event()

        async def handle(batch: Sequence[Delivery]) -> None:
            seen.extend(d.envelope.change_id for d in batch)
            if len(seen) >= 20:
                done.set()

        dead = DeadLetterer(publisher=publisher, service="test")
        consumer = QueueConsumer(connection=connection, queue=Topology.changes_queue(account, 0),
                                 account=account, handler=handle, dead_letters=dead,
                                 prefetch=50, batch_size=7)
        task = asyncio.create_task(consumer.run())
        with anyio.fail_after(20):
            await done.wait()
        assert seen == [f"c{n}" for n in range(20)]

        channel = await connection.channel()
        dlq = await channel.get_queue(Topology.dead_letter_queue(account))
        reasons = {}
        with anyio.fail_after(10):
            async with dlq.iterator() as dead_letters:
                async for message in dead_letters:
                    reasons[message.message_id] = str((message.headers or {})["x-prefsync-reason"])
                    await message.ack()
                    if len(reasons) == 2:
                        break
        assert "unknown schema version 99" in reasons["bad"]
        assert "account mismatch" in reasons["m99"]
        task.cancel()


async def test_failed_handler_is_retried_in_place(topology: Topology, account: str) -> None:
    """A handler that fails once is called again with the same delivery (it used to be nacked
    and redelivered at once, spending a delivery: issue 10, defect 1)."""
    connection = await connect(BROKER_URL, name="test")
    async with connection:
        publisher = await AmqpPublisher.open(connection)
        await publisher.publish_many([change_message(account, 1)])
        attempts: list[bool] = []
        done = anyio.Event()

        async def flaky(batch: Sequence[Delivery]) -> None:
            attempts.append(bool(batch[0].message.redelivered))
            if len(attempts) == 1:
                raise RuntimeError("store unavailable")
            done.set()

        consumer = QueueConsumer(connection=connection, queue=Topology.changes_queue(account, 0),
                                 account=account, handler=flaky,
                                 dead_letters=DeadLetterer(publisher=publisher, service="test"),
                                 prefetch=10, batch_size=10)
        task = asyncio.create_task(consumer.run())
        with anyio.fail_after(20):
            await done.wait()
        assert attempts == [False, False]
        task.cancel()


async def test_a_start_up_step_is_tried_again_while_the_broker_connection_is_lost(
        topology: Topology, account: str) -> None:
    """A connection the broker just closed fails a channel's opening with aiormq's bare
    ``RuntimeError`` (the robust connection has not begun to reconnect yet): a start-up step
    meeting it waits for the reconnection instead of ending the service."""
    connection = await connect(BROKER_URL, name="test")
    async with connection:
        assert connection.transport is not None
        assert not broker_lost(RuntimeError("a bug of ours"), connection)
        await connection.transport.connection.close(ConnectionResetError("closed by the broker"))
        with pytest.raises(RuntimeError) as raised:
            await connection.channel()
        assert broker_lost(raised.value, connection)

        calls = 0

        async def open_publisher() -> AmqpPublisher:
            nonlocal calls
            calls += 1
            return await AmqpPublisher.open(connection)

        publisher = await while_broker_returns(open_publisher, connection=connection,
                                               what="opening a publisher",
                                               retry=RetryPolicy(base_s=0.05, cap_s=0.2))
        await publisher.publish_many([change_message(account, 1)])
        assert calls >= 1

        async def refused() -> str:
            raise ValueError("not a broker problem")

        with pytest.raises(ValueError):
            await while_broker_returns(refused, connection=connection, what="declaring")
