"""An in-memory broker for tests: the same topology, routing and settling rules as RabbitMQ's,
in one process, without a server.

It implements both halves of the broker seam (:mod:`common.messaging.abc`): it is a
:class:`~common.messaging.abc.Publisher` and a :class:`~common.messaging.abc.Transport`, so
the real :class:`~common.messaging.amqp.QueueConsumer` (decoding, batching, retries in place,
splitting, dead letters) runs over it unchanged. What it keeps of RabbitMQ:

1. Exchanges and queues are declared from a :class:`~common.messaging.topology.Topology`;
   topic routing (``*`` one word, ``#`` any number); a message goes to every bound queue.
2. Publishing is confirmed: ``publish_many`` returns once every message is queued, and a
   mandatory message no queue is bound for raises :class:`~common.messaging.abc.Unroutable`
   (nothing of it is queued); a non-mandatory one is dropped.
3. Queues are single active consumer: the first subscriber gets the messages, the others wait
   until it closes. At most ``prefetch`` messages are unsettled at once, handed over in order.
4. A message given back (nack with requeue, or its subscription closed unsettled) returns to
   its place in the queue with its delivery count raised (``x-delivery-count``, as quorum
   queues count); past the queue's delivery limit it is dead-lettered to its dead-letter
   exchange with its dead-letter key, ``x-first-death-reason: delivery_limit``. A message
   given back with a nack is delivered again (room allowing) before the nack returns: RabbitMQ
   may redeliver it while the consumer is still giving back the messages behind it.
5. Once a subscription is closed its messages are stale: settling them does nothing.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.messaging.abc import DELIVERY_COUNT, IncomingMessage, Outgoing, Unroutable
from common.messaging.topology import DEAD_EXCHANGE, DELIVERY_LIMIT, QueueSpec, Topology


class QueueNotFound(LookupError):
    pass


def topic_matches(pattern: str, routing_key: str) -> bool:
    """RabbitMQ's topic rule: words split on dots, ``*`` is one word, ``#`` zero or more."""
    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and (p[0] in ("*", k[0])) and match(p[1:], k[1:])

    return match(pattern.split("."), routing_key.split("."))


@dataclass(kw_only=True)
class Stored:
    """A message in a queue: its order in the queue and how often it was delivered."""

    sequence: int
    outgoing: Outgoing
    deliveries: int = 0


@dataclass(eq=False, kw_only=True)
class MemoryMessage:
    """A delivered message (:class:`~common.messaging.abc.IncomingMessage`)."""

    stored: Stored
    queue: MemoryQueue
    subscription: MemorySubscription
    # this delivery's number (1 for the first)
    delivery: int
    settled: bool = False

    @property
    def body(self) -> bytes:
        return self.stored.outgoing.body

    @property
    def headers(self) -> Mapping[str, Any]:
        spent = self.delivery - 1
        return {**self.stored.outgoing.headers, **({DELIVERY_COUNT: spent} if spent else {})}

    @property
    def message_id(self) -> str:
        return self.stored.outgoing.message_id

    @property
    def exchange(self) -> str:
        return self.stored.outgoing.exchange

    @property
    def routing_key(self) -> str:
        return self.stored.outgoing.routing_key

    @property
    def redelivered(self) -> bool:
        return self.delivery > 1

    def stale(self) -> bool:
        return self.subscription.closed

    async def settle(self, *, ack: bool) -> bool:
        if self.stale() or self.settled:
            return False
        self.settled = True
        self.subscription.unsettled.remove(self)
        if not ack:
            await self.queue.give_back([self.stored])
            # delivered again before the nack returns: the earliest RabbitMQ may (rule 4)
            await self.queue.dispatch()
        self.queue.schedule()
        self.queue.broker.notify()
        return True


@dataclass(eq=False, kw_only=True)
class MemorySubscription:
    queue: MemoryQueue
    prefetch: int
    deliver: Callable[[IncomingMessage], Awaitable[None]]
    unsettled: list[MemoryMessage] = field(default_factory=list)
    closed: bool = False

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.queue.subscribers.remove(self)
        returned = [m.stored for m in self.unsettled]
        self.unsettled.clear()
        await self.queue.give_back(returned)
        self.queue.schedule()
        self.queue.broker.notify()


@dataclass(eq=False, kw_only=True)
class MemoryQueue:
    spec: QueueSpec
    broker: MemoryBroker
    ready: list[Stored] = field(default_factory=list)
    subscribers: list[MemorySubscription] = field(default_factory=list)
    _dispatching: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    def put(self, stored: Stored) -> None:
        self.ready.append(stored)

    async def give_back(self, items: Sequence[Stored]) -> None:
        """Back to their places, in order; past the delivery limit, dead-lettered (rule 4)."""
        limit = self.spec.dead_letter_key is not None
        for stored in items:
            if limit and stored.deliveries > DELIVERY_LIMIT:
                assert self.spec.dead_letter_key is not None
                headers = {**stored.outgoing.headers,
                           "x-first-death-reason": "delivery_limit",
                           "x-first-death-queue": self.name}
                self.broker.route(Outgoing(
                    exchange=DEAD_EXCHANGE, routing_key=self.spec.dead_letter_key,
                    body=stored.outgoing.body, message_id=stored.outgoing.message_id,
                    headers=headers, mandatory=False))
                continue
            self.ready.append(stored)
        self.ready.sort(key=lambda s: s.sequence)

    def schedule(self) -> None:
        """Dispatch soon, as a broker's next frames arrive: not within the caller's step."""
        task = asyncio.get_running_loop().create_task(self.dispatch())
        self.broker.pending.add(task)
        task.add_done_callback(self.broker.pending.discard)

    async def dispatch(self) -> None:
        """Hand ready messages to the active consumer, up to its prefetch (rule 3)."""
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self.subscribers and self.ready:
                active = self.subscribers[0]
                if len(active.unsettled) >= active.prefetch:
                    return
                stored = self.ready.pop(0)
                stored.deliveries += 1
                message = MemoryMessage(stored=stored, queue=self, subscription=active,
                                        delivery=stored.deliveries)
                active.unsettled.append(message)
                await active.deliver(message)
        finally:
            self._dispatching = False


class MemoryBroker:
    """Exchanges, queues and bindings of a :class:`Topology`, in memory (see the module)."""

    def __init__(self, topology: Topology | None = None) -> None:
        self.exchanges: set[str] = set()
        self.queues: dict[str, MemoryQueue] = {}
        self._bindings: list[tuple[str, str, str]] = []
        self._sequence = itertools.count()
        # every message published, in order (tests look at what went out)
        self.published: list[Outgoing] = []
        self._changed: asyncio.Event | None = None
        # dispatches under way (kept referenced until done)
        self.pending: set[asyncio.Task[None]] = set()
        if topology is not None:
            self.declare(topology)

    def declare(self, topology: Topology) -> None:
        self.exchanges |= {spec.name for spec in topology.exchanges}
        for spec in topology.queues:
            self.declare_queue(spec)

    def declare_queue(self, spec: QueueSpec) -> None:
        if spec.name in self.queues:
            return
        self.queues[spec.name] = MemoryQueue(spec=spec, broker=self)
        for exchange, key in spec.bindings:
            self._bindings.append((exchange, key, spec.name))

    def notify(self) -> None:
        """Something was queued, delivered or settled: wake whoever waits in :meth:`idle`."""
        if self._changed is not None:
            self._changed.set()

    # --- publishing (Publisher) ------------------------------------------------------------
    def route(self, item: Outgoing) -> list[MemoryQueue]:
        if item.exchange not in self.exchanges:
            raise Unroutable(f"no exchange {item.exchange!r}")
        targets = [self.queues[name] for exchange, pattern, name in self._bindings
                   if exchange == item.exchange and topic_matches(pattern, item.routing_key)]
        if not targets and item.mandatory:
            raise Unroutable(f"no queue for {item.exchange} {item.routing_key}")
        sequence = next(self._sequence)
        for queue in dict.fromkeys(targets):
            queue.put(Stored(sequence=sequence, outgoing=item))
        self.published.append(item)
        return targets

    async def publish_many(self, items: Sequence[Outgoing]) -> None:
        touched: dict[str, MemoryQueue] = {}
        for item in items:
            for queue in self.route(item):
                touched[queue.name] = queue
        for queue in touched.values():
            queue.schedule()
        self.notify()

    # --- consuming (Transport) -------------------------------------------------------------
    async def subscribe(self, queue: str, *, prefetch: int,
                        deliver: Callable[[IncomingMessage], Awaitable[None]]
                        ) -> MemorySubscription:
        found = self.queues.get(queue)
        if found is None:
            raise QueueNotFound(f"no queue {queue!r}")
        subscription = MemorySubscription(queue=found, prefetch=max(1, prefetch),
                                          deliver=deliver)
        found.subscribers.append(subscription)
        found.schedule()
        return subscription

    # --- for tests -------------------------------------------------------------------------
    def ready(self, queue: str) -> list[Outgoing]:
        """The messages waiting in ``queue`` (not delivered, or given back), in order."""
        return [s.outgoing for s in self.queues[queue].ready]

    def take(self, queue: str) -> list[Outgoing]:
        """Remove and return what waits in ``queue`` (a basic.get of everything)."""
        found = self.queues[queue]
        taken, found.ready = [s.outgoing for s in found.ready], []
        return taken

    def busy(self, *queues: str) -> bool:
        return any(self.queues[q].ready or any(s.unsettled for s in self.queues[q].subscribers)
                   for q in queues)

    async def changed(self) -> None:
        """Wait for the next message queued, delivered or settled."""
        if self._changed is None or self._changed.is_set():
            self._changed = asyncio.Event()
        await self._changed.wait()

    async def idle(self, *queues: str, timeout_s: float = 10.0) -> None:
        """Wait until ``queues`` have nothing ready nor unsettled."""
        async with asyncio.timeout(timeout_s):
            while self.busy(*queues):
                await self.changed()
