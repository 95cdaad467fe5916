"""The broker seam: what services and the consumer see of a broker, apart from any broker.

- A service publishes :class:`Outgoing` messages through a :class:`Publisher` (confirmed:
  it returns once the broker took every message, and raises if one was refused or could not
  be routed) and handles batches of :class:`Delivery` (decoded envelopes with typed fields).
- The consumer (:class:`common.messaging.amqp.QueueConsumer`) takes messages from a
  :class:`Transport` as :class:`IncomingMessage`\\ s, which it alone settles (acks, gives
  back, dead-letters).

Two transports implement it: RabbitMQ (:mod:`common.messaging.amqp`) and the in-memory broker
for tests (:mod:`common.messaging.memory`); ``tests/unit/messaging/test_broker_contract.py``
runs one suite against both.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from common.messaging.envelope import Envelope

# When the poller read the changes of a message (ms since the epoch, an int: AMQP floats may be
# single precision). Progress events report it, so a run's latency can be told from poll to
# write.
POLLED_AT = "x-prefsync-polled-at-ms"
# Why a message was dead-lettered (set by the dead-letterer).
REASON = "x-prefsync-reason"
# Deliveries a message spent before this one (quorum queues set it from the second on).
DELIVERY_COUNT = "x-delivery-count"


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
    """The seam services publish through."""

    async def publish_many(self, items: Sequence[Outgoing]) -> None:
        """Returns once the broker confirmed every item; raises if any was refused or returned."""


class Unroutable(RuntimeError):
    """A mandatory message no queue is bound for (the broker returned it)."""


class IncomingMessage(Protocol):
    """A message as a transport hands it to the consumer."""

    @property
    def body(self) -> bytes: ...

    @property
    def headers(self) -> Mapping[str, Any]: ...

    @property
    def message_id(self) -> str: ...

    @property
    def exchange(self) -> str: ...

    @property
    def routing_key(self) -> str: ...

    @property
    def redelivered(self) -> bool:
        """Delivered before (and given back, or its consumer's channel closed unsettled)."""

    def stale(self) -> bool:
        """Received on a channel that has closed since: the broker redelivers it elsewhere."""

    async def settle(self, *, ack: bool) -> bool:
        """Ack, or give back (requeue); False if its channel is gone (it is redelivered)."""


class Subscription(Protocol):
    async def close(self) -> None:
        """Stop consuming; what was received and not settled goes back to the queue, in order."""


@runtime_checkable
class Transport(Protocol):
    """Where a consumer takes its messages from."""

    async def subscribe(self, queue: str, *, prefetch: int,
                        deliver: Callable[[IncomingMessage], Awaitable[None]]) -> Subscription:
        """Consume ``queue`` (at most ``prefetch`` unsettled), handing each message to
        ``deliver`` in order."""


def _queue_shard(queue: str) -> int | None:
    """The shard of a shard queue (``prefsync.<account>.changes.<n>``, ``...writes.<side>.<n>``)."""
    tail = queue.rsplit(".", 1)[-1]
    return int(tail) if tail.isdigit() else None


@dataclass(kw_only=True, eq=False)
class Delivery:
    """One decoded message, handed to a handler, with what handlers need as typed fields.

    ``message`` is for the messaging layer (settling, dead-lettering): handlers read the
    fields, and settle or dead-letter through the consumer and the dead-letterer only."""

    envelope: Envelope
    message: IncomingMessage
    queue: str
    settled: bool = False

    @property
    def message_id(self) -> str:
        return self.message.message_id

    @property
    def redelivered(self) -> bool:
        return self.message.redelivered

    @property
    def delivery_count(self) -> int:
        """Deliveries this message spent before this one."""
        value = self.message.headers.get(DELIVERY_COUNT)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    @property
    def run_id(self) -> str | None:
        return self.envelope.run_id

    @property
    def shard(self) -> int:
        """The shard of the queue it came from (0 for a queue that is not sharded)."""
        return _queue_shard(self.queue) or 0

    @property
    def polled_at_ms(self) -> int | None:
        """When the poller read the message's changes (ms since the epoch), if it says."""
        value = self.message.headers.get(POLLED_AT)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        return None

    @property
    def polled_at(self) -> datetime | None:
        ms = self.polled_at_ms
        return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


# (what a handler returns is not the consumer's business: see common.messaging.middleware)
BatchHandler = Callable[[Sequence[Delivery]], Awaitable[object]]
