"""The transport when the broker goes away, against a private RabbitMQ node of the test's own.

- A consumer whose channel died under a batch in hand does not end: the ack on the dead channel
  is skipped, the broker redelivers the message on the restored channel, and it is handled
  again (consumers are idempotent).
- A publish while the broker is down fails as a transient broker outage (an advisory event is
  dropped instead), and publishing works again once the broker is back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import anyio
import pytest

from common.messaging.abc import IncomingMessage
from common.messaging.amqp import (
    AmqpPublisher,
    BatchEvent,
    DeadLetterer,
    Delivery,
    Outgoing,
    QueueConsumer,
    connect,
)
from common.messaging.breakers import Breakers, RetryPolicy
from common.messaging.envelope import Envelope, PreferenceChange, encode
from common.messaging.resilience import TransientFailure, dependency_of
from common.messaging.topology import CHANGES_EXCHANGE, CONTROL_EXCHANGE, Topology
from tests.harness.private_services import PrivateRabbitMQ, private_rabbitmq
from tests.harness.unavailable import needs_rabbitmq_server
from tests.harness.waiting import until

pytestmark = [pytest.mark.anyio, pytest.mark.slow, needs_rabbitmq_server]
T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
ACCOUNT = "outage"


@pytest.fixture
async def node() -> AsyncIterator[PrivateRabbitMQ]:
    async with private_rabbitmq() as node:
        connection = await connect(node.url, name="setup")
        async with connection:
            await Topology(accounts=[ACCOUNT], shards=1).declare(await connection.channel())
        yield node


def change(n: int) -> Outgoing:
    env = Envelope(type="preference-changes", account=ACCOUNT, source="dynamics",
                   change_id=f"c{n}", origin_time=T0,
                   changes=(PreferenceChange(email=f"p{n}@example.com", preference_id=1,
                                             opted_in=False, origin_time=T0),))
    return Outgoing(exchange=CHANGES_EXCHANGE, routing_key=Topology.changes_key(ACCOUNT, 0),
                    body=encode(env), message_id=f"m{n}")


async def test_a_consumer_outlives_its_channel(node: PrivateRabbitMQ) -> None:
    connection = await connect(node.url, name="consumer")
    async with connection:
        publisher = await AmqpPublisher.open(connection)
        await publisher.publish_many([change(n) for n in (1, 2, 3)])
        calls: list[tuple[str, bool]] = []
        held: list[IncomingMessage] = []
        in_hand = anyio.Event()
        release = anyio.Event()
        done = anyio.Event()
        consumer: QueueConsumer

        async def handle(batch: Sequence[Delivery]) -> None:
            calls.append((batch[0].message_id, bool(batch[0].message.redelivered)))
            if len(calls) == 1:
                held.append(batch[0].message)
                in_hand.set()
                await release.wait()  # the connection is closed meanwhile

        def observe(event: BatchEvent) -> None:
            if calls[-1] == ("m3", True):
                done.set()

        consumer = QueueConsumer(connection=connection, queue=Topology.changes_queue(ACCOUNT, 0),
                                 account=ACCOUNT, handler=handle, breakers=Breakers(),
                                 retry=RetryPolicy(base_s=0.05, cap_s=0.2),
                                 dead_letters=DeadLetterer(publisher=publisher, service="test"),
                                 prefetch=10, batch_size=1, on_batch=observe)
        task = asyncio.create_task(consumer.run())
        try:
            with anyio.fail_after(20):
                await in_hand.wait()
                await until(lambda: consumer._inbox.qsize() >= 2, timeout_s=20, every=0.01,
                            what="m2 and m3 waiting behind m1")
            await node.close_all_connections()
            with anyio.fail_after(20):
                # the client has no event for it
                await until(held[0].stale, timeout_s=20, what="m1's channel closed")
                await connection.connected.wait()  # reconnected
            release.set()
            with anyio.fail_after(60):
                await done.wait()
            assert not task.done(), task
            # m1's ack on the dead channel was skipped; m2 and m3, received on it, were never
            # handled from there; all three came again on the restored channel, in order
            assert calls == [("m1", False), ("m1", True), ("m2", True), ("m3", True)]
        finally:
            task.cancel()
        check = await connection.channel()
        queue = await check.declare_queue(Topology.changes_queue(ACCOUNT, 0), passive=True)
        assert queue.declaration_result.message_count == 0


async def test_a_publish_during_an_outage_is_a_transient_broker_failure(
        node: PrivateRabbitMQ) -> None:
    connection = await connect(node.url, name="publisher")
    async with connection:
        publisher = AmqpPublisher(
            channel=await connection.channel(publisher_confirms=True, on_return_raises=True),
            timeout_s=2.0, retry=RetryPolicy(base_s=0.1, cap_s=0.5))
        await publisher.publish_many([change(1)])
        await node.stop()
        with pytest.raises(TransientFailure) as info:
            await publisher.publish_many([change(2)])
        assert dependency_of(info.value) == "broker"
        # an advisory event is dropped, never a failure of whoever published it
        await publisher.publish_many([Outgoing(
            exchange=CONTROL_EXCHANGE, routing_key=Topology.progress_key(ACCOUNT, "run"),
            body=b"{}", message_id="progress", mandatory=False)])
        await node.start()
        with anyio.fail_after(30):
            await connection.connected.wait()
        slow = AmqpPublisher(channel=publisher._channel, timeout_s=30.0)
        await slow.publish_many([change(3)])
