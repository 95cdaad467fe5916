"""A reconciler or a writer on the in-memory broker, with a ledger on SQLite in a temporary
directory: the real consumer feeds the real handler, so acks, retries in place, dead letters
and redeliveries are the ones production has."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.messaging.abc import Delivery, Outgoing
from common.messaging.amqp import BatchHandler, DeadLetterer, QueueConsumer
from common.messaging.breakers import Breakers, RetryPolicy
from common.messaging.envelope import decode
from common.messaging.memory import MemoryBroker
from common.messaging.topology import Topology
from common.store import open_store

ACCOUNT = "acme"
SHARDS = 2
# Short backoff and hold: a batch that cannot go through is given back within a second.
FAST = RetryPolicy(base_s=0.01, cap_s=0.05, hold_s=0.5, unknown_attempts=2)


@dataclass
class Bed:
    broker: MemoryBroker
    store: Any
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def dead_letterer(self, service: str) -> DeadLetterer:
        return DeadLetterer(publisher=self.broker, service=service)

    def consume(self, queue: str, handler: BatchHandler, *, service: str) -> QueueConsumer:
        consumer = QueueConsumer(
            connection=self.broker, queue=queue, account=ACCOUNT, handler=handler,
            dead_letters=self.dead_letterer(service), prefetch=50,
            batch_size=50, retry=FAST, breakers=Breakers())
        self.tasks.append(asyncio.create_task(consumer.run()))
        return consumer

    async def drained(self, *queues: str) -> None:
        await self.broker.idle(*queues)

    def dead_letters(self) -> list[Outgoing]:
        return self.broker.take(Topology.dead_letter_queue(ACCOUNT))

    def commands(self, queue: str) -> list[Any]:
        """The changes of every message waiting in ``queue``."""
        return [change for message in self.broker.take(queue)
                for change in decode(message.body).changes]


@asynccontextmanager
async def bed(tmp_path: Path) -> AsyncIterator[Bed]:
    broker = MemoryBroker(Topology(accounts=[ACCOUNT], shards=SHARDS))
    async with open_store(f"sqlite:///{tmp_path}/ledger.db") as store:
        found = Bed(broker=broker, store=store)
        try:
            yield found
        finally:
            for task in found.tasks:
                task.cancel()
            await asyncio.gather(*found.tasks, return_exceptions=True)


class Failing:
    """Wraps a handler: the first ``times`` calls fail as ``error`` does (after the handler
    ran, when ``after`` is set: as a crash after its commit would), then it works."""

    def __init__(self, handler: BatchHandler, *, error: BaseException, times: int = 1,
                 after: bool = False) -> None:
        self._handler = handler
        self._error = error
        self.left = times
        self._after = after
        self.calls: list[list[Delivery]] = []

    async def __call__(self, batch: Sequence[Delivery]) -> None:
        self.calls.append(list(batch))
        if self.left and not self._after:
            self.left -= 1
            raise self._error
        await self._handler(batch)
        if self.left:
            self.left -= 1
            raise self._error


class FailsOnce:
    """``target`` (the bed's store or broker, say) whose first call of ``method`` fails as
    ``error``, as a crash or an outage at that moment would leave it: what was done before
    stays done. Every other call goes through; ``failed`` tells whether it did fail."""

    def __init__(self, target: Any, *, method: str, error: BaseException) -> None:
        self._target = target
        self._method = method
        self._error = error
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._target, name)
        if name != self._method:
            return found

        async def once(*args: Any, **kwargs: Any) -> Any:
            if not self.failed:
                self.failed = True
                raise self._error
            return await found(*args, **kwargs)

        return once
