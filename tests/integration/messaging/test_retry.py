"""A failing batch against a real RabbitMQ: transient failures wait in place, bad messages are
isolated.

- A dependency that is down (here the store) never spends a message's deliveries in a hot
  loop: the batch is retried in place with backoff while the dependency's breaker is open
  (readiness and the metric say so), and it is given back with one nack per hold.
- A message that fails in the handler is found by splitting its batch: it alone is
  dead-lettered with ``x-prefsync-reason``; its neighbours are applied.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import CollectorRegistry

from common.messaging.abc import BatchHandler, IncomingMessage
from common.messaging.amqp import (
    AmqpPublisher,
    BatchObserver,
    DeadLetterer,
    Delivery,
    Outgoing,
    QueueConsumer,
    connect,
)
from common.messaging.breakers import Breakers, RetryPolicy
from common.messaging.envelope import Envelope, PreferenceChange, encode
from common.messaging.resilience import TransientFailure
from common.messaging.topology import CHANGES_EXCHANGE, Topology
from common.ops.health import readiness
from common.ops.metrics import Metrics
from tests.harness.waiting import polled, until

from .conftest import BROKER_URL

pytestmark = pytest.mark.anyio
T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
FAST = RetryPolicy(base_s=0.02, cap_s=0.1)
BAD_PREFERENCE = 666


def change_message(account: str, n: int, *, preference_id: int = 1) -> Outgoing:
    env = Envelope(type="preference-changes", account=account, source="dynamics",
                   change_id=f"c{n}", origin_time=T0,
                   changes=(PreferenceChange(email=f"p{n}@example.com",
                                             preference_id=preference_id, opted_in=False,
                                             origin_time=T0),))
    return Outgoing(exchange=CHANGES_EXCHANGE, routing_key=Topology.changes_key(account, 0),
                    body=encode(env), message_id=f"m{n}")


def delivery_count(message: IncomingMessage) -> int:
    """Deliveries spent before this one (RabbitMQ 3.10 sets the header from the second on)."""
    count = (message.headers or {}).get("x-delivery-count")
    return int(count) if isinstance(count, int | str) else 0


@dataclass
class Probe:
    """What readiness looks at, with a store that always answers."""

    connection: AbstractRobustConnection
    breakers: Breakers
    consumers: list[QueueConsumer] = field(default_factory=list)

    class _Store:
        async def get_checkpoint(self, account: str, source: str) -> str | None:
            return None

    store: Any = field(default_factory=_Store)


async def queue_depth(connection: AbstractRobustConnection, queue: str) -> int:
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
    finally:
        await channel.close()


async def settles_at(connection: AbstractRobustConnection, queue: str, depth: int, *,
                     within_s: float = 5.0) -> int:
    """The queue's depth once it is ``depth``, or as it stands after ``within_s``: a message a
    consumer gave back (a nack, which the broker does not confirm) is counted once the broker
    has handled it, which another channel cannot be told of."""
    found = await queue_depth(connection, queue)

    async def settled() -> bool:
        nonlocal found
        found = await queue_depth(connection, queue)
        return found == depth

    await polled(settled, timeout_s=within_s, every=0.02)
    return found


async def dead_letters(connection: AbstractRobustConnection, account: str, *, expect: int
                       ) -> dict[str, dict[str, Any]]:
    """The first ``expect`` dead letters (message id -> headers), acked."""
    found: dict[str, dict[str, Any]] = {}
    channel = await connection.channel()
    dlq = await channel.get_queue(Topology.dead_letter_queue(account))
    with anyio.fail_after(20):
        async with dlq.iterator() as letters:
            async for message in letters:
                found[message.message_id or ""] = dict(message.headers or {})
                await message.ack()
                if len(found) == expect:
                    break
    await channel.close()
    return found


@asynccontextmanager
async def consuming(connection: AbstractRobustConnection, publisher: AmqpPublisher, account: str,
                    handler: BatchHandler, *, retry: RetryPolicy | None = FAST,
                    breakers: Breakers | None = None, on_batch: BatchObserver | None = None,
                    prefetch: int = 50, batch_size: int = 8) -> AsyncIterator[QueueConsumer]:
    """A consumer of the account's first changes queue, dead-lettering through ``publisher``,
    running meanwhile."""
    consumer = QueueConsumer(connection=connection, queue=Topology.changes_queue(account, 0),
                             account=account, handler=handler, retry=retry,
                             breakers=breakers or Breakers(), on_batch=on_batch,
                             dead_letters=DeadLetterer(publisher=publisher, service="test"),
                             prefetch=prefetch, batch_size=batch_size)
    task = asyncio.create_task(consumer.run())
    try:
        yield consumer
    finally:
        task.cancel()


@pytest.fixture
async def connection(topology: Topology) -> AsyncIterator[AbstractRobustConnection]:
    connection = await connect(BROKER_URL, name="test")
    async with connection:
        yield connection


async def test_a_store_outage_is_waited_out_in_place(connection: AbstractRobustConnection,
                                                     account: str) -> None:
    publisher = await AmqpPublisher.open(connection)
    await publisher.publish_many([change_message(account, 1)])
    breakers = Breakers()
    metrics = Metrics(registry=CollectorRegistry())
    breakers.observe(metrics.dependency_observer(service="reconciler"))
    state = Probe(connection=connection, breakers=breakers)
    seen: list[tuple[bool, int]] = []
    during: list[dict[str, Any]] = []
    done = anyio.Event()
    outage = 6

    def store_up() -> float:
        return metrics.registry.get_sample_value(
            "prefsync_dependency_up", {"service": "reconciler", "dependency": "store"}) or 0.0

    async def flaky(batch: Sequence[Delivery]) -> None:
        seen.append((bool(batch[0].message.redelivered), delivery_count(batch[0].message)))
        if len(seen) > 1:
            during.append({"ready": await readiness(state), "up": store_up()})
        if len(seen) <= outage:
            raise TransientFailure("the ledger store is unavailable", dependency="store")

    queue = Topology.changes_queue(account, 0)
    async with consuming(connection, publisher, account, flaky, breakers=breakers,
                         on_batch=lambda event: None if event.failed else done.set(),
                         prefetch=10, batch_size=10) as consumer:
        state.consumers.append(consumer)
        with anyio.fail_after(20):
            await done.wait()
        # handled once the store came back, on its first delivery: nothing spent, not requeued
        assert seen == [(False, 0)] * (outage + 1)
        # while the store was down, readiness named it and the metric said 0
        for probe in during:
            assert probe["ready"]["ready"] is False
            assert probe["ready"]["checks"]["dependencies_down"] == ["store"]
            assert probe["up"] == 0
        # and it resumed by itself: the breaker closed, readiness and the metric say so
        assert breakers.down() == {}
        assert store_up() == 1
        assert (await readiness(state))["ready"] is True
        assert await queue_depth(connection, queue) == 0
        assert await queue_depth(connection, Topology.dead_letter_queue(account)) == 0


async def test_one_delivery_per_hold_and_no_hot_loop(connection: AbstractRobustConnection,
                                                     account: str) -> None:
    """A long outage: the batch is given back once per hold, each time one delivery."""
    publisher = await AmqpPublisher.open(connection)
    await publisher.publish_many([change_message(account, n) for n in range(3)])
    calls: list[tuple[str, int]] = []
    handled: list[str] = []
    done = anyio.Event()

    async def down_for_two_holds(batch: Sequence[Delivery]) -> None:
        calls.extend((d.message_id, delivery_count(d.message)) for d in batch)
        if min(delivery_count(d.message) for d in batch) < 2:
            raise TransientFailure("dotdigital answers 503", dependency="dotdigital")
        handled.extend(d.message_id for d in batch)
        if len(handled) == 3:
            done.set()

    breakers = Breakers()
    async with consuming(connection, publisher, account, down_for_two_holds,
                         retry=RetryPolicy(base_s=0.02, cap_s=0.05, hold_s=0.6),
                         breakers=breakers, prefetch=10, batch_size=10):
        with anyio.fail_after(30):
            await done.wait()
    tries = {count: sum(1 for m, c in calls if m == "m0" and c == count) for count in (0, 1)}
    # several tries in place within each hold, but a delivery spent only when a hold ended
    assert tries[0] > 2 and tries[1] > 2, calls
    assert {c for _, c in calls} == {0, 1, 2}
    # given back in order: every message kept its place
    assert handled == ["m0", "m1", "m2"]
    # the first try of the batch it got back succeeded: the dependency is back
    assert breakers.down() == {}


async def test_one_bad_change_is_dead_lettered_alone(connection: AbstractRobustConnection,
                                                     account: str) -> None:
    """Its failure shows only in the handler (the preference does not exist), not at decode."""
    publisher = await AmqpPublisher.open(connection)
    good = [n for n in range(8) if n != 5]
    applied: list[str] = []
    batches_with_bad: list[int] = []
    done = anyio.Event()
    consumer: QueueConsumer

    async def handle(batch: Sequence[Delivery]) -> None:
        if batch[0].message_id == "gate":
            # the eight arrive while this batch is in hand, so they make the next batch
            await publisher.publish_many([
                change_message(account, n, preference_id=BAD_PREFERENCE if n == 5 else 1)
                for n in range(8)])
            await until(lambda: consumer._inbox.qsize() >= 8, timeout_s=10, every=0.01,
                        what="the eight in the consumer's inbox")
            return
        if any(d.envelope.changes[0].preference_id == BAD_PREFERENCE  # type: ignore[union-attr]
               for d in batch):
            batches_with_bad.append(len(batch))
            raise ValueError(f"preference {BAD_PREFERENCE} is not in the catalog")
        applied.extend(d.message_id for d in batch)
        if len(applied) == len(good):
            done.set()

    gate = change_message(account, 100)
    await publisher.publish_many([Outgoing(exchange=gate.exchange, routing_key=gate.routing_key,
                                           body=gate.body, message_id="gate")])
    async with consuming(connection, publisher, account, handle) as consumer:
        with anyio.fail_after(30):
            await done.wait()
        dead = await dead_letters(connection, account, expect=1)
    # the healthy ones were applied, in order
    assert applied == [f"m{n}" for n in good]
    # exactly the bad one was dead-lettered, with the reason
    assert list(dead) == ["m5"]
    reason = str(dead["m5"]["x-prefsync-reason"])
    assert "ValueError: preference 666 is not in the catalog" in reason
    assert dead["m5"]["x-prefsync-kind"] == "failed"
    # found by halving the batch (8, then 4..7, then 4..5), then tried alone a few times
    assert batches_with_bad == [8, 4, 2] + [1] * FAST.unknown_attempts
    assert await queue_depth(connection, Topology.dead_letter_queue(account)) == 0
    assert await queue_depth(connection, Topology.changes_queue(account, 0)) == 0


async def test_a_message_that_fails_to_decode_never_reaches_the_handler(
        connection: AbstractRobustConnection, account: str) -> None:
    publisher = await AmqpPublisher.open(connection)
    bad = change_message(account, 2)
    body = bad.body.replace(b"p2@example.com", b"a@b@c.com")
    await publisher.publish_many([
        change_message(account, 1),
        Outgoing(exchange=bad.exchange, routing_key=bad.routing_key, body=body,
                 message_id="m2"),
        change_message(account, 3)])
    handled: list[str] = []
    done = anyio.Event()

    async def handle(batch: Sequence[Delivery]) -> None:
        handled.extend(d.message_id for d in batch)
        if len(handled) == 2:
            done.set()

    async with consuming(connection, publisher, account, handle):
        with anyio.fail_after(20):
            await done.wait()
        dead = await dead_letters(connection, account, expect=1)
    assert handled == ["m1", "m3"]
    assert "changes[0].email: not an email address" in str(dead["m2"]["x-prefsync-reason"])
    assert dead["m2"]["x-prefsync-kind"] == "malformed"


def test_backoff_has_full_jitter_up_to_the_cap() -> None:
    policy = RetryPolicy(base_s=0.5, cap_s=30.0)
    for failures, ceiling in ((0, 0.5), (1, 1.0), (3, 4.0), (6, 30.0), (60, 30.0)):
        delays = [policy.delay(failures) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # spread over the whole range, not a fixed step


async def test_one_probe_at_a_time_while_a_breaker_is_open() -> None:
    """Consumers that meet an open breaker wait for it; only one probes the dependency."""
    breakers = Breakers()
    breaker = breakers["dataverse"]
    policy = RetryPolicy(base_s=0.05, cap_s=0.05)
    breaker.failed("503", probe=False, policy=policy)
    assert breaker.is_open and breakers.down() == {"dataverse": "503"}
    loop = asyncio.get_running_loop()
    await breaker.wait(until=loop.time() + 1)
    assert breaker.take_probe()
    assert not breaker.take_probe()  # the second consumer waits instead
    waiter = asyncio.create_task(breaker.wait(until=loop.time() + 5))
    await asyncio.sleep(0)  # let the waiter run until it waits (no time passes)
    assert not waiter.done() and breaker._waiters  # it waits on the breaker
    breaker.succeeded()
    with anyio.fail_after(1):
        await waiter  # woken by the close, not by its deadline
    assert (breaker.is_open, breakers.down()) == (False, {})


async def test_a_breaker_nobody_waits_for_any_more_closes() -> None:
    """Its consumers stopped (their shards went to another replica): nothing says it is down."""
    breakers = Breakers()
    breaker = breakers["store"]
    first, second = object(), object()
    breaker.failed("locked", probe=False, policy=FAST, claimant=first)
    breaker.failed("locked", probe=False, policy=FAST, claimant=second)
    breaker.leave(first)
    assert breakers.down() == {"store": "locked"}
    breaker.leave(second)
    assert breakers.down() == {}


async def test_a_consumer_handing_its_queue_over_gives_a_held_batch_back_at_once(
        connection: AbstractRobustConnection, account: str) -> None:
    publisher = await AmqpPublisher.open(connection)
    await publisher.publish_many([change_message(account, 1)])
    failed = anyio.Event()

    async def store_down(batch: Sequence[Delivery]) -> None:
        failed.set()
        raise TransientFailure("the ledger store is unavailable", dependency="store")

    breakers = Breakers()
    queue = Topology.changes_queue(account, 0)
    consumer = QueueConsumer(connection=connection, queue=queue, account=account,
                             handler=store_down, breakers=breakers,  # the default hold: 10 min
                             dead_letters=DeadLetterer(publisher=publisher, service="test"),
                             prefetch=10, batch_size=10)
    task = asyncio.create_task(consumer.run())
    with anyio.fail_after(20):
        await failed.wait()
    assert breakers.down() == {"store": "TransientFailure: the ledger store is unavailable"}
    consumer.stop()  # its shard goes to another replica
    with anyio.fail_after(10):
        await task
    assert await settles_at(connection, queue, 1) == 1  # back in the queue for the next one
    assert breakers.down() == {}  # nobody here waits for the store any more
