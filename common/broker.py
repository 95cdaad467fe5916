"""The AMQP transport: confirmed publishing, batch consumers with manual acks, dead letters.

Publishing always uses publisher confirms with ``mandatory`` and treats a returned (unroutable)
message as a failure. Consumers ack only after the handler's side effect is durable. A message
that can never be processed is published to the account's dead-letter queue with its reason and
then acked, and the consumer goes on. Services see none of this: they get decoded envelopes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from common import messages
from common.topology import DEAD_EXCHANGE, Topology

log = logging.getLogger("prefsync.broker")

# How many unconfirmed publishes may be in flight at once on one channel.
CONFIRM_WINDOW = 512


class BrokerUnavailable(RuntimeError):
    pass


async def connect(url: str, *, name: str) -> AbstractRobustConnection:
    """A robust connection (reconnects and restores consumers); credentials never logged."""
    try:
        return await aio_pika.connect_robust(url, client_properties={"connection_name": name})
    except (OSError, aio_pika.exceptions.AMQPConnectionError) as exc:
        host = url.rsplit("@", 1)[-1]
        raise BrokerUnavailable(f"cannot reach RabbitMQ at {host}: {exc}") from None


@dataclass(frozen=True, kw_only=True, slots=True)
class Outgoing:
    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    headers: Mapping[str, Any] = field(default_factory=dict)
    # Advisory events (progress) may have no listener; everything else must route.
    mandatory: bool = True


class Publisher(Protocol):
    """The seam services publish through; tests may swap in their own."""

    async def publish_many(self, items: Sequence[Outgoing]) -> None:
        """Returns once the broker confirmed every item; raises if any was refused or returned."""


class AmqpPublisher:
    def __init__(self, *, channel: AbstractChannel) -> None:
        self._channel = channel
        self._exchanges: dict[str, AbstractExchange] = {}

    @classmethod
    async def open(cls, connection: AbstractRobustConnection) -> AmqpPublisher:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return cls(channel=channel)

    async def _exchange(self, name: str) -> AbstractExchange:
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = await self._channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    async def publish_many(self, items: Sequence[Outgoing]) -> None:
        for start in range(0, len(items), CONFIRM_WINDOW):
            window = items[start:start + CONFIRM_WINDOW]
            results = await asyncio.gather(*(self._publish(i) for i in window),
                                           return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    async def _publish(self, item: Outgoing) -> None:
        exchange = await self._exchange(item.exchange)
        message = aio_pika.Message(
            item.body,
            message_id=item.message_id,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers=dict(item.headers) or None,
            timestamp=time.time(),
        )
        await exchange.publish(message, routing_key=item.routing_key, mandatory=item.mandatory)

    async def close(self) -> None:
        await self._channel.close()


@dataclass(kw_only=True, eq=False)
class Delivery:
    """One decoded message, handed to a handler; settle it through the consumer only."""

    envelope: messages.Envelope
    message: AbstractIncomingMessage
    queue: str
    settled: bool = False

    @property
    def message_id(self) -> str:
        return self.message.message_id or ""


BatchHandler = Callable[[Sequence[Delivery]], Awaitable[None]]


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchEvent:
    """One handled batch, for observers (metrics): ``failed`` means it went back to the queue."""

    queue: str
    account: str
    deliveries: Sequence[Delivery]
    seconds: float
    failed: bool


BatchObserver = Callable[[BatchEvent], None]


class DeadLetterer:
    """Publishes a message to its account's dead-letter queue with the reason, then it is acked."""

    def __init__(self, *, publisher: Publisher, service: str,
                 on_dead_letter: Callable[[str, str], None] | None = None) -> None:
        self._publisher = publisher
        self._service = service
        self._on_dead_letter = on_dead_letter

    async def send(self, message: AbstractIncomingMessage, *, account: str, queue: str,
                   reason: str, code: str = "", kind: str = "malformed",
                   body: bytes | None = None, message_id: str | None = None) -> None:
        """Dead-letter ``message`` (or, with ``body``, just the part of it that failed)."""
        headers = dict(message.headers or {})
        headers.update({
            "x-prefsync-reason": reason[:1000],
            "x-prefsync-kind": kind,
            "x-prefsync-code": code,
            "x-prefsync-service": self._service,
            "x-prefsync-queue": queue,
            "x-prefsync-original-exchange": message.exchange or "",
            "x-prefsync-original-routing-key": message.routing_key or "",
            # a string: AMQP tables would carry a float as 32 bits, minutes off for a time
            "x-prefsync-dead-at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        })
        await self._publisher.publish_many([Outgoing(
            exchange=DEAD_EXCHANGE,
            routing_key=Topology.dead_key(account, kind),
            body=message.body if body is None else body,
            message_id=message_id or message.message_id or "",
            headers=headers,
        )])
        if self._on_dead_letter is not None:
            self._on_dead_letter(account, kind)
        log.warning("dead-lettered a message", extra={
            "account": account, "queue": queue, "reason": reason, "code": code,
            "change_id": message.message_id})


class AccountMismatch(messages.MalformedMessage):
    """A message for another account than its routing key's or its queue's: never handled,
    dead-lettered (kind ``account-mismatch``, counted and logged by the dead-letterer)."""


class QueueConsumer:
    """Consumes one queue on its own channel, in order, handing decoded batches to a handler.

    Malformed messages and messages whose account does not match the routing key and the queue
    are dead-lettered and never reach the handler. A handler exception requeues the batch (the
    queue's delivery limit eventually dead-letters a message that keeps failing).
    """

    def __init__(self, *, connection: AbstractRobustConnection, queue: str, account: str,
                 handler: BatchHandler, dead_letters: DeadLetterer, prefetch: int,
                 batch_size: int, expected_type: messages.MessageType | None = None,
                 on_batch: BatchObserver | None = None) -> None:
        self._connection = connection
        self.queue = queue
        self.account = account
        self._handler = handler
        self._dead = dead_letters
        self._prefetch = prefetch
        self._batch_size = batch_size
        self._expected_type = expected_type
        self._on_batch = on_batch
        # None: stop (see stop())
        self._inbox: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        self._stopping = False
        self._channel: AbstractChannel | None = None
        self._consumer_tag: str | None = None
        self.consuming = asyncio.Event()

    async def run(self) -> None:
        channel = await self._connection.channel(publisher_confirms=False)
        self._channel = channel
        await channel.set_qos(prefetch_count=self._prefetch)
        queue = await channel.get_queue(self.queue, ensure=True)
        self._consumer_tag = await queue.consume(self._inbox.put, no_ack=False)
        self.consuming.set()
        try:
            while not self._stopping:
                first = await self._inbox.get()
                if first is None:
                    break
                batch = [first]
                while len(batch) < self._batch_size and not self._inbox.empty():
                    message = self._inbox.get_nowait()
                    if message is None:
                        break
                    batch.append(message)
                await self._process(batch)
        finally:
            self.consuming.clear()
            with contextlib.suppress(Exception):
                await channel.close()

    async def _process(self, batch: list[AbstractIncomingMessage]) -> None:
        deliveries: list[Delivery] = []
        for message in batch:
            try:
                envelope = messages.decode(message.body)
                self._check(envelope, message)
            except messages.MalformedMessage as exc:
                kind = "account-mismatch" if isinstance(exc, AccountMismatch) else "malformed"
                await self._dead.send(message, account=self.account, queue=self.queue,
                                      reason=exc.reason, kind=kind)
                await message.ack()
                continue
            deliveries.append(Delivery(envelope=envelope, message=message, queue=self.queue))
        if not deliveries:
            return
        started = time.monotonic()
        try:
            await self._handler(deliveries)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("handler failed; the batch goes back to the queue",
                          extra={"account": self.account, "queue": self.queue})
            for delivery in deliveries:
                if not delivery.settled:
                    await delivery.message.nack(requeue=True)
            self._observe(deliveries, started, failed=True)
            return
        for delivery in deliveries:
            if not delivery.settled:
                await delivery.message.ack()
                delivery.settled = True
        self._observe(deliveries, started, failed=False)

    def _observe(self, deliveries: Sequence[Delivery], started: float, *, failed: bool) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(BatchEvent(queue=self.queue, account=self.account,
                                      deliveries=deliveries, failed=failed,
                                      seconds=time.monotonic() - started))
        except Exception:  # an observer must never break consuming
            log.exception("batch observer failed", extra={"account": self.account})

    def stop(self) -> None:
        """Hand the queue over: the batch in hand is finished and settled, then ``run`` closes
        the channel, which returns the prefetched messages to the front of the queue, in order,
        for the next consumer (closing, not ``basic.cancel``, keeps a single active consumer's
        order: the next one is activated only once nothing is outstanding here)."""
        self._stopping = True
        self._inbox.put_nowait(None)

    @property
    def dead_letters(self) -> DeadLetterer:
        return self._dead

    def _check(self, envelope: messages.Envelope, message: AbstractIncomingMessage) -> None:
        key_account = Topology.account_of_key(message.routing_key or "")
        queue_account = Topology.account_of_queue(self.queue)
        if not envelope.account == key_account == queue_account == self.account:
            raise AccountMismatch(
                f"account mismatch: message says {envelope.account!r}, routing key says "
                f"{key_account!r}, queue belongs to {queue_account!r}")
        if self._expected_type is not None and envelope.type != self._expected_type:
            raise messages.MalformedMessage(
                f"unexpected message type {envelope.type!r} on {self.queue}")

    async def dead_letter(self, delivery: Delivery, *, reason: str, code: str = "",
                          kind: str = "rejected") -> None:
        """For handlers: a permanent failure of one delivery (e.g. a vendor refusal)."""
        await self._dead.send(delivery.message, account=self.account, queue=self.queue,
                              reason=reason, code=code, kind=kind)
        await delivery.message.ack()
        delivery.settled = True
