"""The account's queues as the broker sees them, for the worlds of the tests and of ``bench/``:
which queues each service consumes, their depth and consumers, and waiting until a started
service consumes."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence

import aio_pika

from common.domain import SIDES
from common.messaging.topology import Topology
from tests.harness.waiting import polled


def service_queues(account: str, service: str, *, shards: int) -> list[str]:
    """The queues ``service`` consumes for ``account`` (every shard queue, for the shard
    consumers)."""
    return {
        "dynamics-poller": [Topology.trigger_queue(account, "dynamics-poller")],
        "ec-poller": [Topology.trigger_queue(account, "ec-poller")],
        "reconciler": [Topology.changes_queue(account, s) for s in range(shards)],
        "writer": [Topology.writes_queue(account, side, s)
                   for side in SIDES for s in range(shards)],
    }[service]


async def declared(connection: aio_pika.abc.AbstractConnection,
                   queues: Sequence[str]) -> list[tuple[int, int]]:
    """(messages ready, consumers) of each queue; (0, 0) for one not declared yet."""
    counts = []
    channel = await connection.channel()
    for name in queues:
        try:
            result = (await channel.declare_queue(name, passive=True)).declaration_result
            counts.append((result.message_count or 0, result.consumer_count or 0))
        except aio_pika.exceptions.ChannelClosed:
            counts.append((0, 0))
            channel = await connection.channel()
    with contextlib.suppress(Exception):
        await channel.close()
    return counts


async def in_flight(broker_url: str, ctl: Callable[..., Awaitable[str]], *, account: str,
                    shards: int) -> int:
    """Messages in ``account``'s work queues: those ready (each queue's own count, from a
    passive declare) and those held by a consumer (each channel's own count of deliveries not
    acked yet, from ``ctl``, the node's ``rabbitmqctl``): changes not reconciled yet, write
    commands not written yet (e.g. being retried).

    Not ``rabbitmqctl list_queues``: it reports a quorum queue's count as of the queue's last
    metrics tick (every 5 s), so a command published a moment ago would read as none, and a
    world still at work as quiet. Every channel's unacknowledged deliveries count: the other
    consumers of a world ack what they take at once. Not one snapshot either: work hopping
    from queue to queue faster than these reads may slip through one look, which is why a
    converging world looks after each of two quiet runs."""
    queues = [q for service in ("reconciler", "writer")
              for q in service_queues(account, service, shards=shards)]
    connection = await aio_pika.connect(broker_url)
    async with connection:
        ready = sum(count for count, _ in await declared(connection, queues))
    out = await ctl("list_channels", "messages_unacknowledged", "-q", "--no-table-headers")
    return ready + sum(int(line) for line in out.split())


async def wait_consuming(broker_url: str, queues: Sequence[str], *, timeout_s: float = 120.0,
                         check: Callable[[], None] | None = None) -> bool:
    """Until every one of ``queues`` has a consumer (False: ``timeout_s`` passed first);
    ``check`` runs before each look (it raises when what should consume has died)."""
    connection = await aio_pika.connect(broker_url)
    async with connection:

        async def consumed() -> bool:
            if check is not None:
                check()
            return all(consumers > 0 for _, consumers in await declared(connection, queues))

        return bool(await polled(consumed, timeout_s=timeout_s))
