"""Two accounts in one Dynamics org and two dotdigital accounts in one simulator, each
account's services connected as its own RabbitMQ user: the same email stays independent in
each, and a message forged by one account never reaches the other's services.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import aiormq
import pytest

from common.messaging.amqp import account_broker_url
from common.messaging.envelope import (
    Change,
    EligibleContact,
    Envelope,
    MessageType,
    PreferenceChange,
    WriteCommand,
    encode,
)
from common.messaging.topology import CHANGES_EXCHANGE, CONTROL_EXCHANGE, WRITES_EXCHANGE, Topology, shard_of
from common.ops.metrics import REGISTRY
from common.store import open_store
from tests.harness.waiting import until

from ..pipeline.conftest import BROKER_URL, World, make_worlds
from .conftest import require_rabbitmqctl

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[World, World]]:
    require_rabbitmqctl()
    async with make_worlds(tmp_path, accounts=2, broker_users=True) as (a, b):
        await a.start()   # both accounts' services, each on its own broker user
        for world in (a, b):
            summary = await world.sync()
            assert summary["failed"] == 0, summary
        yield a, b


async def test_the_same_email_stays_independent_in_each_account(
        pair: tuple[World, World]) -> None:
    a, b = pair
    person, preference = a.people[6], a.preferences[1]
    email, pid = person.email, preference.id
    await a.edit_dynamics(email, pid, True)
    await b.edit_dynamics(email, pid, False)
    for world in (a, b):
        await world.sync()
    assert await a.values(email, pid) == ({True}, True)
    assert await b.values(email, pid) == ({False}, False)
    # and the other way round, from each account's own dotdigital
    # later: made with dotdigital's clock 5 s on, then put back (a clock still ahead when
    # prefsync measures it would be corrected for)
    await a.set_clock("dotdigital", {"offset_s": 5})
    await a.edit_dotdigital(email, pid, False)
    await b.edit_dotdigital(email, pid, True)
    await a.set_clock("dotdigital", {})
    for world in (a, b):
        await world.sync()
    assert await a.values(email, pid) == ({False}, False)
    assert await b.values(email, pid) == ({True}, True)


def _forged(claimed: str, type_: MessageType, change: Change) -> bytes:
    now = datetime.now(UTC)
    return encode(Envelope(type=type_, account=claimed, source="reconciler",
                                    change_id=f"forged-{type_}", origin_time=now,
                                    changes=(change,)))


async def dead_letters(account: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        queue = await (await connection.channel()).get_queue(
            Topology.dead_letter_queue(account))
        found = []
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            found.append(message)
        return found


def mismatches_counted(account: str) -> float:
    return sum(sample.value for metric in REGISTRY.collect() for sample in metric.samples
               if sample.name == "prefsync_dead_letters_total"
               and sample.labels.get("account") == account
               and "account-mismatch" in sample.labels.values())


async def test_a_forged_message_never_reaches_the_other_account(
        pair: tuple[World, World]) -> None:
    a, b = pair
    person, preference = b.people[9], b.preferences[0]
    email, pid = person.email, preference.id
    _, b_before = await b.values(email, pid)
    shard = shard_of(email, a.config.broker.shards)
    now = datetime.now(UTC)
    write = WriteCommand(email=email, preference_id=pid, side="dotdigital",
                         opted_in=not b_before, origin_time=now, origin_side="dynamics",
                         change_id="forged")
    write_dyn = WriteCommand(email=email, preference_id=pid, side="dynamics",
                             opted_in=not b_before, origin_time=now, origin_side="dotdigital",
                             change_id="forged")
    change = PreferenceChange(email=email, preference_id=pid, opted_in=not b_before,
                              origin_time=now, change_id="forged")
    counted_before = mismatches_counted(a.account)
    a_url = account_broker_url(a.config.broker.url, a.config.account(a.account))
    connection = await aio_pika.connect(a_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        # 1. For B, on B's routing key: the broker refuses it.
        writes = await channel.get_exchange(WRITES_EXCHANGE, ensure=True)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await writes.publish(aio_pika.Message(_forged(b.account, "write-commands", write)),
                                 routing_key=Topology.writes_key(b.account, "dotdigital", shard))
        # 2. Claiming to be B, on A's own routing keys: every one of A's consumers refuses it.
        channel = await connection.channel(publisher_confirms=True)
        forged = [
            (WRITES_EXCHANGE, Topology.writes_key(a.account, "dotdigital", shard),
             _forged(b.account, "write-commands", write)),
            (WRITES_EXCHANGE, Topology.writes_key(a.account, "dynamics", shard),
             _forged(b.account, "write-commands", write_dyn)),
            (CHANGES_EXCHANGE, Topology.changes_key(a.account, shard),
             _forged(b.account, "preference-changes", change)),
            (CONTROL_EXCHANGE, Topology.trigger_key(a.account, "dynamics-poller"),
             _forged(b.account, "sync-trigger", EligibleContact(email=email))),
            (CONTROL_EXCHANGE, Topology.trigger_key(a.account, "ec-poller"),
             _forged(b.account, "sync-trigger", EligibleContact(email=email))),
        ]
        for exchange_name, key, body in forged:
            exchange = await channel.get_exchange(exchange_name, ensure=True)
            await exchange.publish(aio_pika.Message(body, message_id=f"forged:{key}"),
                                   routing_key=key)
    # 3. On B's queue under a routing key that is not B's (possible only with the
    #    administrator's rights, through the default exchange): B's writer refuses it.
    admin = await aio_pika.connect(BROKER_URL)
    async with admin:
        channel = await admin.channel(publisher_confirms=True)
        await channel.default_exchange.publish(
            aio_pika.Message(_forged(b.account, "write-commands", write),
                             message_id="misrouted"),
            routing_key=Topology.writes_queue(b.account, "dotdigital", shard))

    expected_queues = {
        Topology.writes_queue(a.account, "dotdigital", shard),
        Topology.writes_queue(a.account, "dynamics", shard),
        Topology.changes_queue(a.account, shard),
        Topology.trigger_queue(a.account, "dynamics-poller"),
        Topology.trigger_queue(a.account, "ec-poller"),
    }
    a_dead: list[aio_pika.abc.AbstractIncomingMessage] = []
    b_dead: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def all_dead_lettered() -> bool:
        a_dead.extend(await dead_letters(a.account))
        b_dead.extend(await dead_letters(b.account))
        return len(a_dead) >= len(forged) and len(b_dead) >= 1

    await until(all_dead_lettered, timeout_s=30, every=0.02, what="every forged message dead-lettered")
    assert {str((m.headers or {})["x-prefsync-queue"]) for m in a_dead} == expected_queues
    for message in [*a_dead, *b_dead]:
        headers = message.headers or {}
        assert headers["x-prefsync-kind"] == "account-mismatch"
        assert "account mismatch" in str(headers["x-prefsync-reason"])
    assert [m.message_id for m in b_dead] == ["misrouted"]
    assert mismatches_counted(a.account) - counted_before == len(forged)

    # Nothing was applied anywhere: B's value is as it was on both sides, no history of it.
    summary = await b.sync()
    assert summary["failed"] == 0, summary
    assert await b.values(email, pid) == ({b_before}, b_before)
    async with open_store(b.config.store.url) as store:
        for account in (a.account, b.account):
            history = await store.history(account, email)
            assert not [h for h in history if h.change_id == "forged"]
