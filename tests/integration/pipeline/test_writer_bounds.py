"""The dotdigital writer never holds a batch for long (RabbitMQ takes a message back from a
consumer that holds it past ``consumer_timeout``): a preference not read yet defers its writes,
a read under way goes on from the last complete read's watermark (or, without one, is waited for
a bounded time), and an import still pending at its deadline is a
transient unknown that the retry reads back before writing.

The writer's handler runs here on real deliveries from the real broker, against the dotdigital
simulator over a real socket, with short deadlines passed as configuration.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from common import domain
from common.domain import KeyState, Observation, PreferenceKey
from common.messaging.amqp import AmqpMessage, AmqpPublisher, DeadLetterer, Delivery
from common.messaging.envelope import Envelope, WriteCommand, decode, encode
from common.messaging.resilience import TransientFailure, dependency_of
from common.messaging.topology import Topology
from common.store import LedgerStore, open_store
from common.store.checkpoints import reconciler_read_mark
from common.vendors.dotdigital.client import DotdigitalClient, ImportUnfinished
from common.vendors.dotdigital.feed import EPOCH, FeedPosition
from services.writer.dotdigital import READ_WAIT_S, DotdigitalSink
from services.writer.pipeline import Writer
from tests.harness.waiting import until
from tests.harness.world import delete_queues
from tests.unit.vendors.support import DD_ACCOUNT, SimControl, dotdigital_config, dotdigital_sim

from .conftest import BROKER_URL

pytestmark = [pytest.mark.anyio]

FEED = "GET /v2/contacts/with-preference/{preference_id}/opt-ins-since/{date}"


@dataclass
class Bench:
    account: str
    sim: SimControl
    client: DotdigitalClient
    store: LedgerStore
    channel: aio_pika.abc.AbstractChannel
    publisher: AmqpPublisher
    emails: list[str]
    preference: int

    def writer(self, *, read_wait_s: float = READ_WAIT_S) -> Writer:
        sink = DotdigitalSink(account=self.account, store=self.store, client=self.client,
                              shards=1, read_wait_s=read_wait_s)
        return Writer(account=self.account, sink=sink, store=self.store,
                      publisher=self.publisher, shards=1,
                      dead_letters=DeadLetterer(publisher=self.publisher, service="writer"))

    async def registers(self, opted_in: bool) -> list[WriteCommand]:
        """A Dynamics change of every email, reconciled into the ledger; the dotdigital write
        commands the reconciler would send for them."""
        now = datetime.now(UTC)
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # as messages carry it
        commands = []
        for email in self.emails:
            key = PreferenceKey(account=self.account, email=email,
                                preference_id=self.preference)
            decision = domain.reconcile(None, Observation(
                key=key, side="dynamics", opted_in=opted_in, origin_time=now, version=1,
                change_id=f"dyn:{email}:1"))
            await self.store.save([(None, decision.state, None)])
            commands.append(WriteCommand(email=email, preference_id=self.preference,
                                         side="dotdigital", opted_in=opted_in, origin_time=now,
                                         origin_side="dynamics", change_id=f"dyn:{email}:1"))
        return commands

    async def delivery(self, commands: list[WriteCommand]) -> Delivery:
        """The commands as one message, delivered from a real queue."""
        envelope = Envelope(type="write-commands", account=self.account, source="reconciler",
                            change_id=f"w-{secrets.token_hex(4)}",
                            origin_time=datetime.now(UTC), changes=tuple(commands))
        queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await self.channel.default_exchange.publish(
            aio_pika.Message(encode(envelope), message_id=envelope.change_id),
            routing_key=queue.name)
        # basic.get: the broker routes the message at once, so this rarely polls again
        message = await until(lambda: queue.get(fail=False), timeout_s=10, every=0.01,
                              what="the write commands in their queue")
        return Delivery(envelope=decode(message.body), message=AmqpMessage(message),
                        queue=Topology.writes_queue(self.account, "dotdigital", 0))

    async def state(self, email: str) -> KeyState:
        key = PreferenceKey(account=self.account, email=email, preference_id=self.preference)
        return (await self.store.load([key]))[key]

    async def feed_read(self) -> None:
        """The ec-poller's position after a complete read of the preference, started now."""
        started = await self.client.server_time()
        await self.store.set_checkpoint(
            self.account, f"dotdigital:opt-ins:{self.preference}",
            orjson.dumps({"since": started.isoformat(), "previous": EPOCH.isoformat()}).decode())

    async def writes(self) -> int:
        calls = (await self.sim.stats())["calls"]
        return sum(n for k, n in calls.items()
                   if k.startswith(("PUT /v2/contacts", "PUT /contacts/v3/import")))


@asynccontextmanager
async def bench(tmp_path: Path, *, sim_kwargs: dict[str, Any] | None = None,
                **config: Any) -> AsyncIterator[Bench]:
    account = f"wb-{secrets.token_hex(4)}"
    async with dotdigital_sim(**(sim_kwargs or {})) as sim:
        # the seeded states are history: dated back, so the tests' changes are newer
        await sim.clock(offset_s=-5)
        seeded = await sim.seed(records=4, preferences=2, seed=5, account=DD_ACCOUNT)
        await sim.clock()
        async with DotdigitalClient(config=dotdigital_config(sim.url, **config)) as client, \
                open_store(f"sqlite:///{tmp_path}/ledger.db") as store:
            connection = await aio_pika.connect_robust(BROKER_URL)
            async with connection:
                channel = await connection.channel()
                await Topology(accounts=[account], shards=1).declare(channel)
                try:
                    yield Bench(account=account, sim=sim, client=client, store=store,
                                channel=channel, publisher=await AmqpPublisher.open(connection),
                                emails=[e.lower() for e in seeded["emails"][:3]],
                                preference=int(seeded["preferences"][0]))
                finally:
                    await delete_queues(BROKER_URL, account, 1)


async def test_writes_of_a_preference_not_read_yet_are_deferred_not_held(tmp_path: Path) -> None:
    # The ec-poller's first read of the preference has not finished: the batch is not held
    # (it used to wait up to 20 minutes); its writes wait for the reconciler's read markers.
    async with bench(tmp_path) as b:
        commands = await b.registers(opted_in=False)
        before = await b.writes()
        async with asyncio.timeout(15):
            await b.writer().handle([await b.delivery(commands)])
        assert set(await b.store.deferred_emails(b.account, b.preference)) == set(b.emails)
        assert await b.writes() == before


@pytest.mark.parametrize("position", ["incremental-read-under-way", "marker-reconciled"])
async def test_a_read_under_way_is_waited_for_a_bounded_time(tmp_path: Path,
                                                             position: str) -> None:
    async with bench(tmp_path) as b:
        commands = await b.registers(opted_in=False)
        if position == "incremental-read-under-way":
            since = (await b.client.server_time()).isoformat()
            await b.store.set_checkpoint(b.account, f"dotdigital:opt-ins:{b.preference}",
                                         orjson.dumps({"since": since,
                                                       "min_contact_id": 3}).decode())
        else:
            # a first read whose markers this shard has reconciled: a deferral could be missed
            await b.store.set_checkpoint(b.account, reconciler_read_mark(b.preference, 0),
                                         datetime.now(UTC).isoformat())
        began = time.monotonic()
        async with asyncio.timeout(15):
            with pytest.raises(TransientFailure) as caught:
                await b.writer(read_wait_s=0.5).handle([await b.delivery(commands)])
        assert time.monotonic() - began < 10
        assert dependency_of(caught.value) == "dotdigital"
        # once the read is there, the same batch goes through
        await b.feed_read()
        await b.writer(read_wait_s=0.5).handle([await b.delivery(commands)])
        for email in b.emails:
            assert (await b.client.subscriptions(email)).by_preference()[b.preference]\
                .is_opted_in is False


async def test_a_read_under_way_that_keeps_the_last_watermark_is_not_waited_for(
        tmp_path: Path) -> None:
    # The ec-poller's next read of the preference is under way: its checkpoint keeps the last
    # complete read's watermark, so the batch reads the feed from there and is written at
    # once (with no time to wait, a wait would fail it).
    async with bench(tmp_path) as b:
        await b.feed_read()
        name = f"dotdigital:opt-ins:{b.preference}"
        finished = FeedPosition.decode(await b.store.get_checkpoint(b.account, name))
        await b.store.set_checkpoint(b.account, name, FeedPosition(
            since=finished.since, min_contact_id=3,
            last_watermark=finished.watermark).encode())
        commands = await b.registers(opted_in=False)
        reads, writes = (await b.sim.stats())["calls"].get(FEED, 0), await b.writes()
        async with asyncio.timeout(15):
            await b.writer(read_wait_s=0.0).handle([await b.delivery(commands)])
        assert (await b.sim.stats())["calls"].get(FEED, 0) > reads
        assert await b.writes() > writes
        for email in b.emails:
            assert (await b.client.subscriptions(email)).by_preference()[b.preference]\
                .is_opted_in is False


async def test_an_import_pending_past_its_deadline_is_read_back_before_writing_again(
        tmp_path: Path) -> None:
    # The simulator keeps the import "NotFinished" for an hour; the writer gives up polling at
    # the configured deadline, fails transiently, and the import lands later. The retry reads
    # dotdigital back first: it sees the landed values and does not import them again.
    async with bench(tmp_path, sim_kwargs={"import_delay_s": 3600},
                     import_deadline_s=1.0) as b:
        await b.feed_read()
        commands = await b.registers(opted_in=False)
        writer = b.writer()
        async with asyncio.timeout(30):
            with pytest.raises(ImportUnfinished) as caught:
                await writer.handle([await b.delivery(commands)])
        assert dependency_of(caught.value) == "dotdigital"
        for email in b.emails:  # in flight: not confirmed, not abandoned
            assert [r.in_flight for r in (await b.state(email)).writes.dotdigital] == [True]
        await b.sim.call("POST", "dotdigital/imports/run")  # it lands after all
        writes = await b.writes()
        async with asyncio.timeout(30):
            await writer.handle([await b.delivery(commands)])  # the redelivery
        assert await b.writes() == writes
        for email in b.emails:
            state = await b.state(email)
            known = state.known.dotdigital
            assert known is not None and known.opted_in is False, email
            assert not domain.outstanding(state)
            assert (await b.client.subscriptions(email)).by_preference()[b.preference]\
                .is_opted_in is False


async def test_a_change_read_just_before_the_write_is_known_overwritten(tmp_path: Path) -> None:
    # A Dynamics opt-out, then the person opts in on dotdigital in the same second (a tie the
    # opt-out wins). The writer reads the opt-in before writing and writes the opt-out after
    # it: dotdigital is known to hold the opt-out at once, so no write stays outstanding there
    # (it used to, until the echo was read, because the write's window, taken from whole-second
    # clock readings less a margin, started before the opt-in's stamp).
    async with bench(tmp_path) as b:
        await b.feed_read()
        commands = await b.registers(opted_in=False)
        email = b.emails[0]
        await b.sim.call("POST", "dotdigital/edit", {
            "account": DD_ACCOUNT, "email": email, "preferences": {str(b.preference): True}})
        async with asyncio.timeout(30):
            await b.writer().handle([await b.delivery(commands[:1])])
        assert (await b.client.subscriptions(email)).by_preference()[b.preference]\
            .is_opted_in is False
        state = await b.state(email)
        assert state.known.dotdigital is not None and not state.known.dotdigital.opted_in
        assert "dotdigital" not in [c.side for c in domain.outstanding(state)]
