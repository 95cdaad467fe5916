"""The raw broker ceiling on this machine: confirmed persistent publish plus consume, with
aio-pika alone, of messages shaped like the pipeline's.

Messages are real preference-change envelopes of ``CHUNK`` changes (the size the pollers
publish), published persistent with publisher confirms in windows of the publisher's confirm
window to the same kind of queues (quorum, one per shard), and consumed at the same time with
the services' prefetch, in batches of the consumers' batch size, acked one by one after each
batch. The rate at which changes get through one such hop is the ceiling every pipeline figure
is divided by: the pipeline takes each change through two hops, a ledger and two vendor APIs,
so it can only ever reach a fraction of it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import UTC, datetime
from typing import Any

import aio_pika

from common.config import BrokerConfig
from common.messaging.amqp import CONFIRM_WINDOW
from common.messaging.envelope import PreferenceChange
from common.messaging.publishing import CHUNK, envelopes_by_shard
from services.runtime.registry import SHARD_BATCH

# The services' defaults (config [broker] prefetch, the shard consumers' batch size).
PREFETCH = BrokerConfig(url="").prefetch
BATCH = SHARD_BATCH


def sample_bodies(*, messages: int, shards: int) -> list[bytes]:
    """``messages`` bodies of ``CHUNK`` changes each, as the dynamics-poller encodes them."""
    now = datetime.now(UTC)
    changes = [PreferenceChange(email=f"person.{i}@example.com", preference_id=1001 + i % 5,
                                opted_in=i % 2 == 0, origin_time=now, version=100_000 + i,
                                change_id=f"dyn:{secrets.token_hex(16)}:{100_000 + i}")
               for i in range(CHUNK * shards)]
    one_round = [o.body for o in envelopes_by_shard(
        account="bench-ceiling", source="dynamics", type="preference-changes", changes=changes,
        shards=shards, run_id="ceiling", id_seed="ceiling")]
    return [one_round[i % len(one_round)] for i in range(messages)]


async def measure_ceiling(*, broker_url: str, messages: int, shards: int = 4,
                          prefetch: int = PREFETCH, batch: int = BATCH) -> dict[str, Any]:
    bodies = sample_bodies(messages=messages, shards=shards)
    names = [f"prefsync.bench-ceiling-{secrets.token_hex(4)}.{s}" for s in range(shards)]
    connection = await aio_pika.connect(broker_url)
    async with connection:
        setup = await connection.channel()
        for name in names:
            await setup.declare_queue(name, durable=True,
                                      arguments={"x-queue-type": "quorum"})
        try:
            consumed = asyncio.Event()
            remaining = [messages]
            consumers = [asyncio.create_task(_consume(connection, name, prefetch, batch,
                                                      remaining, consumed))
                         for name in names]
            await asyncio.sleep(0.2)  # consumers subscribed
            started = time.monotonic()
            published = await _publish(connection, names, bodies)
            await asyncio.wait_for(consumed.wait(), timeout=600)
            seconds = time.monotonic() - started
            for task in consumers:
                task.cancel()
            await asyncio.gather(*consumers, return_exceptions=True)
        finally:
            for name in names:
                await setup.queue_delete(name)
    size = sum(len(b) for b in bodies) / len(bodies)
    return {
        "messages": messages,
        "changes_per_message": CHUNK,
        "message_bytes": round(size),
        "shards": shards,
        "prefetch": prefetch,
        "batch": batch,
        "confirm_window": CONFIRM_WINDOW,
        "seconds": round(seconds, 3),
        "publish_seconds": round(published, 3),
        "messages_per_s": round(messages / seconds, 1),
        "states_per_s": round(messages * CHUNK / seconds),
        "mb_per_s": round(messages * size / seconds / 1e6, 1),
    }


async def _publish(connection: aio_pika.abc.AbstractConnection, names: list[str],
                   bodies: list[bytes]) -> float:
    started = time.monotonic()
    channel = await connection.channel(publisher_confirms=True)
    exchange = channel.default_exchange
    for start in range(0, len(bodies), CONFIRM_WINDOW):
        window = bodies[start:start + CONFIRM_WINDOW]
        await asyncio.gather(*(
            exchange.publish(aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                              content_type="application/json",
                                              message_id=secrets.token_hex(12)),
                             routing_key=names[(start + i) % len(names)], mandatory=True)
            for i, body in enumerate(window)))
    await channel.close()
    return time.monotonic() - started


async def _consume(connection: aio_pika.abc.AbstractConnection, name: str, prefetch: int,
                   batch: int, remaining: list[int], consumed: asyncio.Event) -> None:
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.get_queue(name)
    inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    await queue.consume(inbox.put)
    try:
        while True:
            taken = [await inbox.get()]
            while len(taken) < batch and not inbox.empty():
                taken.append(inbox.get_nowait())
            for message in taken:
                await message.ack()
            remaining[0] -= len(taken)
            if remaining[0] <= 0:
                consumed.set()
    finally:
        await asyncio.shield(channel.close())
