from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest

from common.messaging.topology import Topology

BROKER_URL = os.environ.get("PREFSYNC_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")


@pytest.fixture
def account() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def topology(account: str) -> AsyncIterator[Topology]:
    """A declared topology for a fresh account, deleted afterwards."""
    topo = Topology(accounts=[account], shards=2)
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel()
        await topo.declare(channel)
        yield topo
        channel = await connection.channel()
        for queue in topo.queues:
            await channel.queue_delete(queue.name)
