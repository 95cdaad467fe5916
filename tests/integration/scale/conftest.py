"""Fixtures for replica tests: a declared account on the real broker, a store on each backend."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection

from common.messaging.amqp import AmqpPublisher, Outgoing
from common.messaging.envelope import Envelope, encode
from common.messaging.publishing import stable_id
from common.messaging.topology import CONTROL_EXCHANGE, Topology

from ..store.backends import BACKENDS, store_url

BROKER_URL = os.environ.get("PREFSYNC_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")


@dataclass
class Broker:
    account: str
    topology: Topology
    connection: AbstractRobustConnection
    publisher: AmqpPublisher

    async def trigger(self, poller: str = "dynamics-poller") -> str:
        """A sync trigger on the poller's control queue, as ``sync-now`` sends it."""
        run_id = uuid.uuid4().hex
        envelope = Envelope(type="sync-trigger", account=self.account, source="control",
                            change_id=stable_id("test", run_id), origin_time=datetime.now(UTC),
                            changes=(), run_id=run_id, extra={"reason": "test"})
        await self.publisher.publish_many([Outgoing(
            exchange=CONTROL_EXCHANGE, routing_key=Topology.trigger_key(self.account, poller),
            body=encode(envelope), message_id=envelope.change_id)])
        return run_id


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    """A fresh account's topology (4 shards), deleted afterwards."""
    account = f"t{uuid.uuid4().hex[:10]}"
    topology = Topology(accounts=[account], shards=4)
    connection = await aio_pika.connect_robust(BROKER_URL)
    async with connection:
        await topology.declare(await connection.channel())
        publisher = await AmqpPublisher.open(connection)
        try:
            yield Broker(account=account, topology=topology, connection=connection,
                         publisher=publisher)
        finally:
            channel = await connection.channel()
            for queue in topology.queues:
                await channel.queue_delete(queue.name)


@pytest.fixture(params=BACKENDS)
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    async with store_url(str(request.param), tmp_path) as u:
        yield u
