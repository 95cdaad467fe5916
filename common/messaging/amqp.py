"""The AMQP transport: confirmed publishing, batch consumers with manual acks, dead letters.

Publishing always uses publisher confirms with ``mandatory`` and treats a returned (unroutable)
message as a failure. Consumers ack only after the handler's side effect is durable. Services
see none of this: they get :class:`~common.messaging.abc.Delivery` objects (decoded envelopes
with typed fields). The consumer takes its messages from a
:class:`~common.messaging.abc.Transport`: RabbitMQ (:class:`AmqpTransport`) or, in tests, the
in-memory broker (:mod:`common.messaging.memory`), so the rules below are the same for both.

What a consumer does with a batch (:class:`QueueConsumer`):

1. A message that fails to decode, or belongs to another account, is published to the
   account's dead-letter queue with its reason and acked; it never reaches the handler.
2. A handler failure that :func:`common.messaging.resilience.dependency_of` calls transient (the store,
   the broker or a vendor is down) is retried **in place**: the same deliveries, not nacked,
   with exponential backoff and full jitter, through that dependency's circuit breaker
   (:mod:`common.messaging.breakers`): one consumer probes, the others wait for the breaker to close.
   The consumer takes no new work meanwhile (it is sequential): that is the pause.
3. A batch is held at most ``hold_s`` (10 minutes by default) from the arrival of its oldest
   message, well below RabbitMQ's ``consumer_timeout`` (30 minutes). Then the batch, and the
   messages prefetched behind it, are given back with one ``nack(requeue=True)`` each, in
   order. So an outage spends at most one delivery per message per hold window: the queues'
   delivery limit of 20 takes 20 x 10 minutes (over three hours) of outage, not seconds, on
   RabbitMQ 3.10, which counts requeues; on 4.x, which may not count them, nothing spins
   either, because the bound is the hold, not the broker's count.
4. Any other failure may be a bad message: the batch is split in halves, each half handled
   on its own, down to the single message at fault. That message is retried in place a few
   times with backoff (an unknown error may still be passing), then dead-lettered with the
   exception as ``x-prefsync-reason``; its neighbours are applied and acked.
5. A broker outage closes the channel: acks and nacks on it are skipped (the broker
   redelivers those messages; consumers are idempotent), messages received on the dead
   channel are dropped unhandled, and the robust connection restores the channel and the
   consumer, which goes on with the redelivered messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import aiormq.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from aio_pika.exceptions import ChannelInvalidStateError

from common.config import AccountConfig
from common.messaging.abc import (
    REASON,
    BatchHandler,
    Delivery,
    IncomingMessage,
    Outgoing,
    Publisher,
    Subscription,
    Transport,
)
from common.messaging.breakers import Breakers, CircuitBreaker, RetryPolicy, current_breakers
from common.messaging.envelope import Envelope, MalformedMessage, MessageType, decode
from common.messaging.resilience import Dependency, TransientFailure, dependency_of
from common.messaging.topology import DEAD_EXCHANGE, Topology
from common.ops import failpoints

log = logging.getLogger("prefsync.broker")

__all__ = [
    "AccountMismatch",
    "AmqpMessage",
    "AmqpPublisher",
    "AmqpTransport",
    "BatchEvent",
    "BatchHandler",
    "BatchObserver",
    "BrokerUnavailable",
    "DeadLetterer",
    "Delivery",
    "IncomingMessage",
    "Outgoing",
    "Publisher",
    "QueueConsumer",
    "account_broker_url",
    "connect",
]

# How many unconfirmed publishes may be in flight at once on one channel.
CONFIRM_WINDOW = 512
# How long a window of publishes may wait for the broker's confirms, or for the connection to
# come back, before it fails as a broker outage; and how often it tries again meanwhile.
PUBLISH_TIMEOUT_S = 60.0
PUBLISH_RETRY = RetryPolicy(base_s=0.25, cap_s=5.0)


class BrokerUnavailable(RuntimeError):
    """RabbitMQ cannot be reached; ``refused``: it answered and refused us (credentials,
    vhost), a configuration error that waiting does not mend."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


async def connect(url: str, *, name: str, wait: bool = False,
                  retry: RetryPolicy | None = None) -> AbstractRobustConnection:
    """A robust connection (reconnects and restores consumers); credentials never logged.

    Unreachable: a command fails at once (:class:`BrokerUnavailable`); a long-running service
    (``wait``) keeps trying, with backoff and jitter, so that one started during a broker
    restart (a container restarted by its policy, say) comes up once the broker is back."""
    host = url.rsplit("@", 1)[-1]

    async def attempt() -> AbstractRobustConnection:
        try:
            return await aio_pika.connect_robust(url, client_properties={"connection_name": name})
        except (OSError, aio_pika.exceptions.AMQPConnectionError) as exc:
            raise BrokerUnavailable(f"cannot reach RabbitMQ at {host}: {exc}",
                                    refused=isinstance(
                                        exc, aiormq.exceptions.ProbableAuthenticationError)
                                    ) from None

    if not wait:
        return await attempt()
    # refused credentials or vhost are a configuration error: never waited out
    return await (retry or RetryPolicy()).until_done(
        attempt, what=name,
        waits_out=lambda exc: isinstance(exc, BrokerUnavailable) and not exc.refused)


def account_broker_url(url: str, account: AccountConfig) -> str:
    """The URL the account's services connect with: its own user when it has a password."""
    password = account.broker.password
    if password is None:
        return url
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{quote(account.broker.user, safe='')}:{quote(password.reveal(), safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


class AmqpPublisher:
    """Confirmed publishing on one channel of a robust connection.

    1. A publish that the lost connection cut short is sent again (the same message ids:
       consumers take a repeat for the same message), with backoff, until the connection is
       back or ``timeout_s`` has passed; then it raises :class:`TransientFailure` naming the
       broker, so a handler's batch waits with backoff like for any outage.
    2. A refused or returned (unroutable) message raises aio-pika's ``DeliveryError`` at once.
    3. An advisory event (``mandatory=False``: progress) the broker cannot take in time is
       dropped with a warning: it has no listener to lose, and whoever publishes it must not
       fail for it.
    """

    def __init__(self, *, channel: AbstractChannel,
                 timeout_s: float = PUBLISH_TIMEOUT_S,
                 retry: RetryPolicy = PUBLISH_RETRY) -> None:
        self._channel = channel
        self._timeout_s = timeout_s
        self._retry = retry
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
            try:
                await self._publish_window(window)
            except TransientFailure as exc:
                if any(item.mandatory for item in window):
                    raise
                log.warning("an advisory event was not published: %s", exc.reason)

    async def _publish_window(self, window: Sequence[Outgoing]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        pending = list(window)
        failures = 0
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    results = await asyncio.gather(*(self._publish(i) for i in pending),
                                                   return_exceptions=True)
            except TimeoutError:
                raise TransientFailure(f"the broker confirmed no publish in "
                                       f"{self._timeout_s:g} s", dependency="broker") from None
            for result in results:
                if isinstance(result, BaseException) and not _connection_lost(result):
                    raise result
            lost = [(item, result) for item, result in zip(pending, results, strict=True)
                    if isinstance(result, BaseException)]
            if not lost:
                return
            delay = self._retry.delay(failures)
            if loop.time() + delay >= deadline:
                raise TransientFailure(f"publish failed: {_describe(lost[0][1])}",
                                       dependency="broker") from lost[0][1]
            failures += 1
            pending = [item for item, _ in lost]
            log.info("the broker connection is down; publishing again shortly",
                     extra={"messages": len(pending)})
            await asyncio.sleep(delay)

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


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchEvent:
    """One handled batch, for observers (metrics): ``failed`` means it went back to the queue."""

    queue: str
    account: str
    deliveries: Sequence[Delivery]
    seconds: float
    failed: bool


BatchObserver = Callable[[BatchEvent], None]


class AmqpMessage:
    """An aio-pika message as the consumer sees it (:class:`~common.messaging.abc.IncomingMessage`)."""

    __slots__ = ("raw",)

    def __init__(self, raw: AbstractIncomingMessage) -> None:
        self.raw = raw

    @property
    def body(self) -> bytes:
        return self.raw.body

    @property
    def headers(self) -> Mapping[str, Any]:
        return self.raw.headers or {}

    @property
    def message_id(self) -> str:
        return self.raw.message_id or ""

    @property
    def exchange(self) -> str:
        return self.raw.exchange or ""

    @property
    def routing_key(self) -> str:
        return self.raw.routing_key or ""

    @property
    def redelivered(self) -> bool:
        return bool(self.raw.redelivered)

    def stale(self) -> bool:
        try:
            self.raw.channel  # noqa: B018 - raises once the channel is closed
        except ChannelInvalidStateError:
            return True
        return False

    async def settle(self, *, ack: bool) -> bool:
        try:
            if ack:
                await self.raw.ack()
            else:
                await self.raw.nack(requeue=True)
        except (ChannelInvalidStateError, aiormq.exceptions.AMQPError, ConnectionError) as exc:
            log.info("could not settle a message, its channel is closed; the broker "
                     "redelivers it", extra={"change_id": self.message_id,
                                             "error": type(exc).__name__})
            return False
        return True


class AmqpSubscription:
    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel

    async def close(self) -> None:
        # closing (not basic.cancel) returns what was prefetched to the front of the queue
        await self._channel.close()


class AmqpTransport:
    """Consuming from RabbitMQ: one channel per queue, with manual acks."""

    def __init__(self, connection: AbstractRobustConnection) -> None:
        self._connection = connection

    async def subscribe(self, queue: str, *, prefetch: int,
                        deliver: Callable[[IncomingMessage], Awaitable[None]]
                        ) -> AmqpSubscription:
        channel = await self._connection.channel(publisher_confirms=False)
        try:
            await channel.set_qos(prefetch_count=prefetch)
            found = await channel.get_queue(queue, ensure=True)

            async def receive(message: AbstractIncomingMessage) -> None:
                await deliver(AmqpMessage(message))

            await found.consume(receive, no_ack=False)
        except asyncio.CancelledError:
            raise
        except Exception:
            with contextlib.suppress(Exception):
                await channel.close()
            raise
        return AmqpSubscription(channel)


class DeadLetterer:
    """Publishes a message to its account's dead-letter queue with the reason, then it is acked."""

    def __init__(self, *, publisher: Publisher, service: str,
                 on_dead_letter: Callable[[str, str], None] | None = None) -> None:
        self._publisher = publisher
        self._service = service
        self._on_dead_letter = on_dead_letter

    async def send(self, message: IncomingMessage, *, account: str, queue: str,
                   reason: str, code: str = "", kind: str = "malformed",
                   body: bytes | None = None, message_id: str | None = None) -> None:
        """Dead-letter ``message`` (or, with ``body``, just the part of it that failed)."""
        headers = dict(message.headers)
        headers.update({
            REASON: reason[:1000],
            "x-prefsync-kind": kind,
            "x-prefsync-code": code,
            "x-prefsync-service": self._service,
            "x-prefsync-queue": queue,
            "x-prefsync-original-exchange": message.exchange,
            "x-prefsync-original-routing-key": message.routing_key,
            # a string: AMQP tables would carry a float as 32 bits, minutes off for a time
            "x-prefsync-dead-at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        })
        await self._publisher.publish_many([Outgoing(
            exchange=DEAD_EXCHANGE,
            routing_key=Topology.dead_key(account, kind),
            body=message.body if body is None else body,
            message_id=message_id or message.message_id,
            headers=headers,
        )])
        if self._on_dead_letter is not None:
            self._on_dead_letter(account, kind)
        log.warning("dead-lettered a message", extra={
            "account": account, "queue": queue, "reason": reason, "code": code,
            "change_id": message.message_id})

    async def send_part(self, delivery: Delivery, *, account: str, reason: str, code: str,
                        kind: str, body: bytes, message_id: str) -> None:
        """For handlers: dead-letter the part of ``delivery`` that failed for good (``body``,
        under its own message id); the delivery itself is acked as handled."""
        await self.send(delivery.message, account=account, queue=delivery.queue,
                        reason=reason, code=code, kind=kind, body=body, message_id=message_id)


class AccountMismatch(MalformedMessage):
    """A message for another account than its routing key's or its queue's: never handled,
    dead-lettered (kind ``account-mismatch``, counted and logged by the dead-letterer)."""


class _Released(Exception):
    """The batch in hand goes back: its hold ran out, the consumer stops, or its channel died."""


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]


def _connection_lost(exc: BaseException) -> bool:
    """The connection (or the channel with it) went down: nothing is wrong with the message."""
    return isinstance(exc, ChannelInvalidStateError | aiormq.exceptions.AMQPConnectionError
                      | ConnectionError)


def _stale(message: IncomingMessage) -> bool:
    return message.stale()


async def _settle(message: IncomingMessage, *, ack: bool) -> bool:
    """Ack (or nack with requeue); False if the channel is gone (the broker redelivers)."""
    return await message.settle(ack=ack)


class QueueConsumer:
    """Consumes one queue on its own channel, in order, handing decoded batches to a handler.

    See the module's docstring for what happens to a batch that fails. ``retry`` sets the
    backoff and the hold; ``breakers`` is the registry of circuit breakers (by default the one
    in use where the consumer is built, :func:`common.messaging.breakers.use_breakers`).
    """

    def __init__(self, *, connection: AbstractRobustConnection | Transport, queue: str,
                 account: str,
                 handler: BatchHandler, dead_letters: DeadLetterer, prefetch: int,
                 batch_size: int | Callable[[], int],
                 batch_bytes: int | Callable[[], int] | None = None,
                 expected_type: MessageType | None = None,
                 on_batch: BatchObserver | None = None, retry: RetryPolicy | None = None,
                 breakers: Breakers | None = None) -> None:
        # RabbitMQ (a connection), or any other transport (the in-memory broker in tests)
        self._transport: Transport = (connection if isinstance(connection, Transport)
                                      else AmqpTransport(connection))
        self.queue = queue
        self.account = account
        self._handler = handler
        self._dead = dead_letters
        self._prefetch = prefetch
        # at most this many messages a batch (a callable: as it says when a batch is taken)
        self._batch_size = batch_size if callable(batch_size) else (lambda: batch_size)
        # and at most this many bytes of bodies, beyond its first message (None: no limit);
        # the message that would pass it is carried to the next batch, which it starts
        self._batch_bytes = (batch_bytes if callable(batch_bytes) or batch_bytes is None
                             else (lambda: batch_bytes))
        self._carried: tuple[IncomingMessage, float] | None = None
        self._expected_type = expected_type
        self._on_batch = on_batch
        self._retry = retry if retry is not None else RetryPolicy()
        self._breakers = breakers if breakers is not None else current_breakers()
        # (message, loop time it arrived); None: stop (see stop())
        self._inbox: asyncio.Queue[tuple[IncomingMessage, float] | None] = (
            asyncio.Queue())
        self._stopping = False
        self._stopped = asyncio.Event()
        self.consuming = asyncio.Event()
        # the batch in hand: its messages not settled yet, in order, and when its hold ends
        self._in_hand: list[IncomingMessage] = []
        self._hold_until = 0.0
        # the breakers this consumer's work met open, until it sees a success
        self._owed: set[CircuitBreaker] = set()

    async def run(self) -> None:
        try:
            subscription = await self._open()
        except _Released:  # stopped before the broker could be reached
            subscription = None
        if subscription is None:
            self._leave_breakers()
            return
        try:
            while not self._stopping:
                first, self._carried = self._carried or await self._inbox.get(), None
                if first is None:
                    break
                batch = [first]
                most = self._batch_size()
                room = (None if self._batch_bytes is None
                        else self._batch_bytes() - len(first[0].body))
                while len(batch) < most and not self._inbox.empty():
                    item = self._inbox.get_nowait()
                    if item is None:
                        break
                    if room is not None:
                        room -= len(item[0].body)
                        if room < 0:
                            self._carried = item
                            break
                    batch.append(item)
                fresh = [item for item in batch if not _stale(item[0])]
                if len(fresh) < len(batch):
                    log.info("dropped messages received before the broker connection was lost "
                             "(the broker redelivers them)",
                             extra={"account": self.account, "queue": self.queue,
                                    "dropped": len(batch) - len(fresh)})
                if fresh:
                    await self._process(fresh)
        finally:
            self.consuming.clear()
            self._leave_breakers()
            with contextlib.suppress(Exception):
                await subscription.close()

    def _leave_breakers(self) -> None:
        for breaker in self._owed:
            breaker.leave(self)
        self._owed.clear()

    async def _open(self) -> Subscription | None:
        """Open the channel and consume; while the broker is unreachable, try again with
        backoff (a shard taken over during an outage must not end the process)."""
        failures = 0
        while not self._stopping:
            try:
                subscription = await self._transport.subscribe(
                    self.queue, prefetch=self._prefetch, deliver=self._receive)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                missing = isinstance(exc, aio_pika.exceptions.ChannelNotFoundEntity)
                if missing or (dependency_of(exc) != "broker"
                               and not isinstance(exc, OSError | RuntimeError)):
                    raise
                log.warning("cannot consume yet, the broker is unavailable: %s",
                            type(exc).__name__, extra={"account": self.account,
                                                       "queue": self.queue})
                await self._interruptible(asyncio.sleep(self._retry.delay(failures)))
                failures += 1
                continue
            self.consuming.set()
            return subscription
        return None

    async def _receive(self, message: IncomingMessage) -> None:
        self._inbox.put_nowait((message, asyncio.get_running_loop().time()))

    # --- one batch ---------------------------------------------------------------------------
    async def _process(self, batch: list[tuple[IncomingMessage, float]]) -> None:
        self._in_hand = [message for message, _ in batch]
        # the hold counts from the oldest arrival: prefetched messages wait in the inbox too
        self._hold_until = batch[0][1] + self._retry.hold_s
        started = time.monotonic()
        deliveries: list[Delivery] = []
        try:
            for message, _ in batch:
                try:
                    envelope = decode(message.body)
                    self._check(envelope, message)
                except MalformedMessage as exc:
                    kind = "account-mismatch" if isinstance(exc, AccountMismatch) else "malformed"
                    await self._dead_letter(message, reason=exc.reason, kind=kind)
                    continue
                deliveries.append(Delivery(envelope=envelope, message=message,
                                           queue=self.queue))
            if deliveries:
                await self._handle(deliveries)
        except _Released as why:
            await self._release(str(why))
            self._observe([d for d in deliveries if not d.settled], started, failed=True)
        finally:
            self._in_hand = []

    async def _handle(self, deliveries: list[Delivery]) -> None:
        """Handle ``deliveries``; a part failing for a reason that is not transient is split
        in halves until the message at fault is alone, and that one is dead-lettered."""
        groups: deque[list[Delivery]] = deque([deliveries])
        while groups:
            group = [d for d in groups.popleft() if not d.settled]
            if not group:
                continue
            started = time.monotonic()
            failure = await self._attempt(partial(self._call_handler, group),
                                          held=[d.message for d in group],
                                          single=len(group) == 1)
            if failure is None:
                await failpoints.reached("consumer.before-ack")
                for delivery in group:
                    await self._ack(delivery)
                self._observe(group, started, failed=False)
            elif len(group) > 1:
                log.warning("a batch failed (%s); handling it in halves to find the message at "
                            "fault", type(failure).__name__, exc_info=failure,
                            extra={"account": self.account, "queue": self.queue,
                                   "messages": len(group)})
                middle = len(group) // 2
                groups.extendleft([group[middle:], group[:middle]])
            else:
                delivery = group[0]
                kind = "malformed" if isinstance(failure, MalformedMessage) else "failed"
                await self._dead_letter(delivery.message, reason=f"handler failed: "
                                        f"{_describe(failure)}", kind=kind)
                delivery.settled = True

    async def _call_handler(self, group: Sequence[Delivery]) -> None:
        pending = [d for d in group if not d.settled]  # the handler may settle some itself
        if pending:
            await self._handler(pending)

    async def _attempt(self, call: Callable[[], Awaitable[None]], *,
                       held: Sequence[IncomingMessage], single: bool,
                       proves: Dependency | None = None) -> Exception | None:
        """Run ``call`` until it succeeds (None), waiting out transient failures in place.

        A success closes the breakers this consumer met open (only ``proves``'s, when given:
        a call that uses that dependency alone says nothing of the others).

        Returns the exception of a failure that is not transient: at once for several messages
        (the caller splits them), after ``unknown_attempts`` tries with backoff for a single
        one. Raises :class:`_Released` when the hold ends, the consumer stops or the channel
        dies while it waits.
        """
        probing: CircuitBreaker | None = None
        unknown = 0
        try:
            while True:
                if any(_stale(m) for m in held):
                    raise _Released("the channel closed")
                try:
                    await call()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    dependency = dependency_of(exc)
                    if dependency is None:
                        if probing is not None:
                            probing.abandon_probe()
                            probing = None
                        unknown += 1
                        if (not single or isinstance(exc, MalformedMessage)
                                or unknown >= self._retry.unknown_attempts):
                            return exc
                        log.warning("a message failed (%s); trying it again",
                                    _describe(exc), exc_info=exc,
                                    extra={"account": self.account, "queue": self.queue})
                        await self._pause(self._retry.delay(unknown - 1))
                        continue
                    breaker = self._breakers[dependency]
                    if not breaker.is_open:
                        log.warning("%s unavailable; holding the batch and retrying with backoff",
                                    dependency, extra={"account": self.account,
                                                       "queue": self.queue,
                                                       "error": type(exc).__name__})
                    breaker.failed(_describe(exc), probe=probing is breaker, policy=self._retry,
                                   claimant=self)
                    self._owed.add(breaker)
                    if probing is not None and probing is not breaker:
                        probing.abandon_probe()
                    probing = None
                    probing = await self._turn(breaker)
                    continue
                # what this consumer's work met down works again
                for owed in list(self._owed):
                    if proves is None or owed.dependency == proves:
                        owed.succeeded()
                        self._owed.discard(owed)
                return None  # (a probe still open here is given up in ``finally``)
        finally:
            if probing is not None:
                probing.abandon_probe()

    async def _turn(self, breaker: CircuitBreaker) -> CircuitBreaker | None:
        """Wait until ``breaker`` closes (None) or this consumer may probe (the breaker)."""
        loop = asyncio.get_running_loop()
        while True:
            if loop.time() >= self._hold_until:
                raise _Released(f"{breaker.dependency} still unavailable after the hold")
            if not breaker.is_open:
                return None
            if breaker.take_probe():
                return breaker
            await self._interruptible(breaker.wait(until=self._hold_until))

    async def _pause(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() + seconds >= self._hold_until:
            raise _Released("the hold ran out")
        await self._interruptible(asyncio.sleep(seconds))

    async def _interruptible(self, wait: Awaitable[None]) -> None:
        """Await ``wait``, or raise :class:`_Released` as soon as the consumer is stopped."""
        if self._stopping:
            if asyncio.iscoroutine(wait):
                wait.close()  # never started: not a "never awaited" warning
            raise _Released("the consumer stops")
        waiting = asyncio.ensure_future(wait)
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait({waiting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiting, stopped):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        if self._stopping:
            raise _Released("the consumer stops")

    async def _release(self, why: str) -> None:
        """Give back the batch in hand, then what was prefetched behind it, in order: one
        nack each (one delivery spent per hold). Messages of a closed channel are dropped:
        the broker has requeued them already."""
        # What was prefetched behind the batch is taken now, before the first nack: the broker
        # may redeliver a message given back while the rest are being given back, and a
        # redelivery must wait in the inbox for the next batch. Given back again, it would
        # spend another delivery, come back behind the messages it came before, and could keep
        # this loop busy for as long as the broker redelivers faster than it gives back.
        behind: list[tuple[IncomingMessage, float]] = []
        stop = False
        while not self._inbox.empty():
            item = self._inbox.get_nowait()
            if item is None:
                stop = True
            else:
                behind.append(item)
        returned = 0
        for message in self._in_hand:
            if not _stale(message) and await _settle(message, ack=False):
                returned += 1
        self._in_hand = []
        # then the message carried to the next batch, which came first of those prefetched
        carried, self._carried = self._carried, None
        if carried is not None and not _stale(carried[0]) and await _settle(carried[0],
                                                                            ack=False):
            returned += 1
        for message, _ in behind:
            if not _stale(message) and await _settle(message, ack=False):
                returned += 1
        if stop:
            self._inbox.put_nowait(None)
        log.warning("gave a batch back to the queue: %s", why,
                    extra={"account": self.account, "queue": self.queue, "returned": returned})

    async def _ack(self, delivery: Delivery) -> None:
        if delivery.settled:
            return
        delivery.settled = True
        await _settle(delivery.message, ack=True)
        self._forget(delivery.message)

    def _forget(self, message: IncomingMessage) -> None:
        with contextlib.suppress(ValueError):
            self._in_hand.remove(message)

    async def _dead_letter(self, message: IncomingMessage, *, reason: str, kind: str,
                           code: str = "") -> None:
        """Dead-letter ``message`` and ack it; while the broker refuses the dead letter, wait
        as for any broker outage."""
        async def send() -> None:
            try:
                await self._dead.send(message, account=self.account, queue=self.queue,
                                      reason=reason, code=code, kind=kind)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise TransientFailure(f"dead-lettering failed: {_describe(exc)}",
                                       dependency="broker") from exc

        await self._attempt(send, held=[message], single=False, proves="broker")
        await _settle(message, ack=True)
        self._forget(message)

    def _observe(self, deliveries: Sequence[Delivery], started: float, *, failed: bool) -> None:
        if self._on_batch is None or not deliveries:
            return
        try:
            self._on_batch(BatchEvent(queue=self.queue, account=self.account,
                                      deliveries=deliveries, failed=failed,
                                      seconds=time.monotonic() - started))
        except Exception:  # an observer must never break consuming
            log.exception("batch observer failed", extra={"account": self.account})

    def stop(self) -> None:
        """Hand the queue over: the batch in hand is finished and settled (a batch waiting for
        a dependency is given back at once), then ``run`` closes the channel, which returns the
        prefetched messages to the front of the queue, in order, for the next consumer
        (closing, not ``basic.cancel``, keeps a single active consumer's order: the next one is
        activated only once nothing is outstanding here)."""
        self._stopping = True
        self._stopped.set()
        self._inbox.put_nowait(None)

    @property
    def dead_letters(self) -> DeadLetterer:
        return self._dead

    def _check(self, envelope: Envelope, message: IncomingMessage) -> None:
        key_account = Topology.account_of_key(message.routing_key)
        queue_account = Topology.account_of_queue(self.queue)
        if not envelope.account == key_account == queue_account == self.account:
            raise AccountMismatch(
                f"account mismatch: message says {envelope.account!r}, routing key says "
                f"{key_account!r}, queue belongs to {queue_account!r}")
        if self._expected_type is not None and envelope.type != self._expected_type:
            raise MalformedMessage(
                f"unexpected message type {envelope.type!r} on {self.queue}")

    async def dead_letter(self, delivery: Delivery, *, reason: str, code: str = "",
                          kind: str = "rejected") -> None:
        """For handlers: a permanent failure of one delivery (e.g. a vendor refusal)."""
        await self._dead.send(delivery.message, account=self.account, queue=self.queue,
                              reason=reason, code=code, kind=kind)
        delivery.settled = True
        await _settle(delivery.message, ack=True)
        self._forget(delivery.message)


# What a broker connection lost mid-call raises (a robust connection then reconnects by itself).
BROKER_LOST = (aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPException, ConnectionError,
               ChannelInvalidStateError)


def broker_lost(exc: BaseException, connection: AbstractConnection) -> bool:
    """``exc`` came from ``connection`` going away under a call: one of :data:`BROKER_LOST`, or
    the bare ``RuntimeError`` aiormq raises when a channel is opened on a connection the broker
    has just closed (before the robust connection has noticed and begun to reconnect)."""
    if isinstance(exc, BROKER_LOST):
        return True
    transport = connection.transport
    return isinstance(exc, RuntimeError) and (transport is None or transport.connection.is_closed)


T = TypeVar("T")


async def while_broker_returns(step: Callable[[], Awaitable[T]], *,
                               connection: AbstractConnection, what: str,
                               retry: RetryPolicy | None = None) -> T:
    """``step`` (a call on ``connection``), tried again with backoff while the connection is
    lost under it (:func:`broker_lost`): a service that starts during a broker restart, or whose
    connections the broker closes then, comes up once the broker is back; a consumer of events
    follows them again."""
    return await (retry or RetryPolicy()).until_done(
        step, what=what, waits_out=lambda exc: broker_lost(exc, connection))
