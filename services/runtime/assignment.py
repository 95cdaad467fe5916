"""Which replica consumes which shard queue: membership in the ledger store, SAC as the guard.

Every replica of a service (reconciler, writer) renews its membership in one group per account
(``<service>/<account>``) about every second. All replicas read the same live membership and
compute the same assignment from it (:func:`assign`: the account's shard queues dealt round the
sorted members), and each consumes only the queues assigned to it. When a replica joins, leaves
or stops renewing (killed: its membership expires after ``ttl_s``), the assignment changes and
shards move:

- the replica that loses a queue finishes the batch in hand, then closes that channel, which
  returns its prefetched messages to the front of the queue, in order;
- the replica that gains it subscribes at once. Every shard queue has a single active consumer,
  so if the previous holder has not let go yet (it has not seen the new membership, or it is
  finishing a batch) the new subscription waits as the standby and becomes active only when the
  previous one is gone. Two replicas therefore never handle one shard at the same time, whatever
  the timing, and the membership only decides where the work goes.

Why not consumer priorities: RabbitMQ 3.10 activates the first registered consumer of a
single-active-consumer queue whatever its ``x-priority`` (priorities decide only from 3.13 on),
so the spread has to be decided by the replicas themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import orjson

from common.messaging.amqp import QueueConsumer
from common.store.interface import Coordination

log = logging.getLogger("prefsync.assignment")

HEARTBEAT_S = 1.0
# A replica that has not renewed for this long is taken for dead and its shards move.
MEMBER_TTL_S = 4.0


def replica_id() -> str:
    """This process's name among the replicas: ``$PREFSYNC_REPLICA_ID`` (e.g. the pod name), or
    host, process id and a random suffix."""
    return os.environ.get("PREFSYNC_REPLICA_ID") or (
        f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}")


def group_name(service: str, account: str) -> str:
    return f"{service}/{account}"


def assign(*, group: str, queues: Sequence[str], members: Sequence[str]) -> dict[str, str]:
    """Queue -> member: the sorted queues dealt round the sorted members, starting at a member
    that depends on the group, so accounts with fewer shards than replicas use different
    replicas. Every replica computes the same answer from the same membership."""
    if not members:
        return {}
    ordered = sorted(set(members))
    start = zlib.crc32(group.encode()) % len(ordered)
    return {queue: ordered[(start + i) % len(ordered)]
            for i, queue in enumerate(sorted(queues))}


@dataclass
class _Group:
    name: str
    makers: dict[str, Callable[[], QueueConsumer]] = field(default_factory=dict)
    held: dict[str, QueueConsumer] = field(default_factory=dict)


class ShardAssigner:
    """Runs this replica's share of the shard consumers of one service, following membership.

    ``consumers`` is kept listing the consumers this replica runs now (health checks read it).
    """

    def __init__(self, *, service: str, store: Coordination, member: str,
                 consumers: list[QueueConsumer] | None = None,
                 heartbeat_s: float = HEARTBEAT_S, ttl_s: float = MEMBER_TTL_S) -> None:
        self.service = service
        self.member = member
        self._store = store
        self._consumers = consumers if consumers is not None else []
        self._heartbeat_s = heartbeat_s
        self._ttl_s = ttl_s
        self._groups: dict[str, _Group] = {}
        # set once the first assignment's consumers are all consuming
        self.settled = asyncio.Event()

    def add(self, *, account: str, queue: str, make: Callable[[], QueueConsumer]) -> None:
        """A shard queue of ``account`` this service may consume; ``make`` builds its consumer."""
        name = group_name(self.service, account)
        self._groups.setdefault(name, _Group(name=name)).makers[queue] = make

    @property
    def held(self) -> dict[str, list[str]]:
        """Group -> the queues this replica consumes now."""
        return {g.name: sorted(g.held) for g in self._groups.values()}

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                while True:
                    await self._round(tasks)
                    await asyncio.sleep(self._heartbeat_s)
        finally:
            # The consumers' channels are closed by now; leaving lets the others take over at
            # once instead of after the TTL.
            with contextlib.suppress(Exception):
                await self._store.leave(self.member, list(self._groups))

    async def _round(self, tasks: asyncio.TaskGroup) -> None:
        details = {name: orjson.dumps(sorted(g.held)).decode()
                   for name, g in self._groups.items()}
        try:
            live = await self._store.heartbeat(self.member, details, self._ttl_s)
        except Exception:
            # Keep what we hold: single active consumer keeps it safe if others take over.
            log.exception("membership heartbeat failed", extra={"service": self.service})
            return
        started: list[QueueConsumer] = []
        for name, group in self._groups.items():
            members = set(live.get(name, {})) | {self.member}
            mine = {q for q, m in assign(group=name, queues=list(group.makers),
                                         members=sorted(members)).items() if m == self.member}
            for queue in sorted(set(group.held) - mine):
                self._release(group, queue)
            for queue in sorted(mine - set(group.held)):
                started.append(self._take(group, queue, tasks))
        if not self.settled.is_set():
            # Only the first round waits (readiness); later ones must not delay the heartbeat.
            await self._until_consuming(started)
            self.settled.set()
            log.info("consuming its shards", extra={"service": self.service,
                                                    "replica": self.member, "queues": self.held})

    def _take(self, group: _Group, queue: str, tasks: asyncio.TaskGroup) -> QueueConsumer:
        consumer = group.makers[queue]()
        group.held[queue] = consumer
        self._consumers.append(consumer)
        task = tasks.create_task(consumer.run())
        task.add_done_callback(lambda _: self._forget(consumer))
        log.info("took a shard", extra={"service": self.service, "queue": queue,
                                        "replica": self.member})
        return consumer

    def _release(self, group: _Group, queue: str) -> None:
        consumer = group.held.pop(queue)
        consumer.stop()  # its task ends after the batch in hand; then it is forgotten
        log.info("handing a shard over", extra={"service": self.service, "queue": queue,
                                                "replica": self.member})

    def _forget(self, consumer: QueueConsumer) -> None:
        with contextlib.suppress(ValueError):
            self._consumers.remove(consumer)

    async def _until_consuming(self, consumers: Sequence[QueueConsumer]) -> None:
        waits = [asyncio.ensure_future(c.consuming.wait()) for c in consumers]
        if not waits:
            return
        _, pending = await asyncio.wait(waits, timeout=30)
        for waiter in pending:
            waiter.cancel()


def parse_detail(detail: str) -> list[str]:
    """The queues a member reported holding (the ``detail`` of its membership)."""
    value = orjson.loads(detail)
    return [str(q) for q in value] if isinstance(value, list) else []


def holders(members: Mapping[str, str]) -> dict[str, str]:
    """Queue -> member, from a group's membership details (who reported holding what)."""
    return {queue: member for member, detail in members.items()
            for queue in parse_detail(detail)}
