"""``prefsync dlq`` against the real broker: entries from the services and from the broker."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import pytest

from common.config import Config, parse_config
from common.messaging.amqp import AmqpPublisher, Outgoing, connect
from common.messaging.topology import CHANGES_EXCHANGE, DEAD_EXCHANGE, Topology
from services.cli.dlq import describe, dlq_command, replay_refusal, walk
from tests.harness.waiting import until

pytestmark = pytest.mark.anyio
BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"


def config_for(account: str, tmp_path: Path) -> Config:
    return parse_config({
        "broker": {"url": BROKER_URL, "shards": 1},
        "store": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
        "accounts": [{
            "id": account,
            "dynamics": {"url": "http://127.0.0.1:1", "token_url": "http://127.0.0.1:1/t",
                         "client_id": "c", "client_secret_env": "S"},
            "dotdigital": {"url": "http://127.0.0.1:1", "api_user": "u", "password_env": "S"},
        }]}, env={"S": "x"})


@pytest.fixture
async def dead(tmp_path: Path) -> AsyncIterator[tuple[Config, str]]:
    """An account with three dead letters: two from a service, one from the broker."""
    account = f"dlq{uuid.uuid4().hex[:8]}"
    topology = Topology(accounts=[account], shards=1)
    connection = await connect(BROKER_URL, name="test-dlq")
    async with connection:
        channel = await connection.channel()
        await topology.declare(channel)
        publisher = await AmqpPublisher.open(connection)
        for n, (kind, code) in enumerate((("malformed", ""), ("write-dotdigital", "ERROR_X"))):
            await publisher.publish_many([Outgoing(
                exchange=DEAD_EXCHANGE, routing_key=Topology.dead_key(account, kind),
                body=b'{"n": %d}' % n, message_id=f"ours-{n}", headers={
                    "x-prefsync-reason": f"reason number {n}", "x-prefsync-code": code,
                    "x-prefsync-kind": kind, "x-prefsync-queue": "q",
                    "x-prefsync-original-exchange": CHANGES_EXCHANGE,
                    "x-prefsync-original-routing-key": Topology.changes_key(account, 0),
                    "x-prefsync-dead-at": (datetime.now(UTC) - timedelta(hours=1)).isoformat()})])
        # the broker dead-letters a message that keeps failing (delivery limit)
        await publisher.publish_many([Outgoing(
            exchange=CHANGES_EXCHANGE, routing_key=Topology.changes_key(account, 0),
            body=b"poison", message_id="poison-1")])
        consumer_channel = await connection.channel()
        await consumer_channel.set_qos(prefetch_count=1)
        queue = await consumer_channel.get_queue(Topology.changes_queue(account, 0))

        async def refuse(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.reject(requeue=True)

        await queue.consume(refuse)
        # the broker tells no client when it dead-letters: its dead-letter queue is looked at
        await until(lambda: has_depth(account, 3), timeout_s=10, every=0.025,
                    what="the poison message dead-lettered by the broker")
        await consumer_channel.close()
        assert await depth(account) == 3
        yield config_for(account, Path("/tmp")), account
        channel = await connection.channel()
        for spec in topology.queues:
            await channel.queue_delete(spec.name)


async def has_depth(account: str, wanted: int) -> bool:
    return await depth(account) == wanted


async def depth(account: str) -> int:
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(Topology.dead_letter_queue(account), passive=True)
        return queue.declaration_result.message_count or 0


async def test_list_shows_reasons_and_keeps_every_entry_in_order(
        dead: tuple[Config, str]) -> None:
    config, account = dead
    for _ in range(3):  # listing again and again uses up no delivery attempt
        out = io.StringIO()
        assert await dlq_command(config=config, action="list", out=out) == 0
    lines = out.getvalue().splitlines()
    assert "ours-0" in lines[0] and "malformed" in lines[0] and "1.0h" in lines[0]
    assert "ours-1" in lines[1] and "write-dotdigital/ERROR_X" in lines[1]
    assert "poison-1" in lines[2] and "delivery_limit" in lines[2]
    assert f"prefsync.changes/{account}.changes.0" in lines[2]
    assert "3 entries" in lines[-1]
    assert await depth(account) == 3


async def test_show_prints_details_and_body(dead: tuple[Config, str]) -> None:
    config, account = dead
    out = io.StringIO()
    assert await dlq_command(config=config, action="show", reason="delivery_limit",
                             out=out) == 0
    text = out.getvalue()
    assert "poison-1" in text and "by broker" in text and "poison" in text
    assert "ours-0" not in text
    assert await depth(account) == 3


async def test_reason_filter_matches_kind_code_or_text(dead: tuple[Config, str]) -> None:
    _, account = dead
    connection = await connect(BROKER_URL, name="test-dlq")
    async with connection:
        by_code = await walk(connection, accounts=[account], action="list", reason="error_x")
        by_text = await walk(connection, accounts=[account], action="list", reason="number 0")
        by_id = await walk(connection, accounts=[account], action="list", ids=["poison-1"])
    assert [e.message_id for e in by_code.entries] == ["ours-1"]
    assert [e.message_id for e in by_text.entries] == ["ours-0"]
    assert [e.message_id for e in by_id.entries] == ["poison-1"]


async def test_replay_puts_entries_back_on_their_original_route(
        dead: tuple[Config, str]) -> None:
    config, account = dead
    out = io.StringIO()
    assert await dlq_command(config=config, action="replay", reason="delivery_limit",
                             account=account, out=out) == 0
    assert "1 replayed" in out.getvalue()
    assert await depth(account) == 2
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1)
        queue = await channel.get_queue(Topology.changes_queue(account, 0))
        received: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        await queue.consume(received.put)
        message = await asyncio.wait_for(received.get(), timeout=10)
        assert message.body == b"poison" and message.message_id == "poison-1"
        assert "x-death" not in (message.headers or {})
        await message.ack()


async def test_purge_removes_only_the_matching_entries(dead: tuple[Config, str]) -> None:
    config, account = dead
    out = io.StringIO()
    assert await dlq_command(config=config, action="purge", reason="malformed", out=out) == 0
    assert "1 purged" in out.getvalue()
    assert await depth(account) == 2
    out = io.StringIO()
    assert await dlq_command(config=config, action="purge", out=out) == 0
    assert "2 purged" in out.getvalue()
    assert await depth(account) == 0


def test_replay_is_refused_outside_the_account() -> None:
    now = datetime.now(UTC)
    entry = describe(account="acme", position=1, body=b"", message_id="m", headers={
        "x-death": [{"count": 1, "reason": "delivery_limit", "queue": "q",
                     "time": now - timedelta(minutes=5), "exchange": CHANGES_EXCHANGE,
                     "routing-keys": ["other.changes.0"]}]})
    assert entry.by == "broker" and entry.reason == "delivery_limit"
    assert entry.age_s(now) == pytest.approx(300)
    assert replay_refusal(entry) is not None
    ours = describe(account="acme", position=1, body=b"", message_id="m", headers={
        "x-prefsync-kind": "rejected", "x-prefsync-original-exchange": DEAD_EXCHANGE,
        "x-prefsync-original-routing-key": "acme.dead.x"})
    assert replay_refusal(ours) is not None
