"""The outstanding-work sweep: what it publishes again, when, and what it leaves alone (on both
ledger backends, with a publisher that records); then end to end, a write whose command was lost
(its queue purged) is published again and lands, and the metrics show it meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import pytest

from common.config import ConfigError, SweepConfig, load_config
from common.domain import ContactState, KeyState, Known, PerSide, PreferenceKey, Register
from common.messaging.envelope import WriteCommand, decode
from common.messaging.publishing import CapturingPublisher
from common.messaging.topology import WRITES_EXCHANGE, Topology, shard_of
from common.ops.metrics import REGISTRY
from common.store import LedgerStore, open_store
from common.store.directory import RecordRef
from services.cli.sync_now import request_sync
from services.reconciler.service import Reconciler
from services.reconciler.sweep import OutstandingSweep
from tests.harness.waiting import until
from tests.unit.config.test_config import ENV, GOOD

from ..store.backends import BACKENDS, store_url
from .conftest import BROKER_URL, make_world

pytestmark = pytest.mark.anyio

T = datetime(2026, 3, 1, 9, 0, 0, tzinfo=UTC)
PREF = 1001
SHARDS = 2
GRACE_S = 120.0
INTERVAL_S = 300.0


def commands(published: CapturingPublisher) -> list[WriteCommand]:
    return [c for item in published.items for c in decode(item.body).changes
            if isinstance(c, WriteCommand)]


def key(email: str) -> PreferenceKey:
    return PreferenceKey(account="acme", email=email, preference_id=PREF)


def waiting_for(k: PreferenceKey, *, dotdigital: bool | None) -> KeyState:
    """An opt-out from Dynamics that dotdigital does not hold (``dotdigital``: what it is known
    to hold, None: unknown)."""
    register = Register(opted_in=False, origin_time=T, origin_side="dynamics", change_id="c1")
    held = Known(opted_in=False, as_of=T)
    return KeyState(key=k, register=register, known=PerSide(
        dynamics=held,
        dotdigital=None if dotdigital is None else Known(opted_in=dotdigital, as_of=T)))


@contextlib.asynccontextmanager
async def ledger(backend: str, tmp_path: Path) -> AsyncIterator[LedgerStore]:
    async with store_url(backend, tmp_path) as url, open_store(url) as store:
        yield store


def sweeper(store: LedgerStore, publisher: CapturingPublisher, *, holder: str = "a",
            after_s: Callable[[], float] = lambda: 0.0) -> OutstandingSweep:
    """A sweep whose clock runs ``after_s()`` seconds ahead of the real one (the index's ages
    are taken from the real clock when states are saved)."""
    reconciler = Reconciler(account="acme", store=store, publisher=publisher, shards=SHARDS)
    return OutstandingSweep(account="acme", store=store, publisher=publisher,
                            reconciler=reconciler, shards=SHARDS, holder=holder,
                            interval_s=INTERVAL_S, grace_s=GRACE_S,
                            now=lambda: datetime.now(UTC) + timedelta(seconds=after_s()))


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_write_still_outstanding_after_the_grace_period_is_published_again(
        backend: str, tmp_path: Path) -> None:
    async with ledger(backend, tmp_path) as store:
        ann, bob = key("ann@example.com"), key("bob@example.com")
        await store.save([(None, waiting_for(ann, dotdigital=True), None),
                          (None, waiting_for(bob, dotdigital=False), None)])  # bob: in step
        recorder, clock = CapturingPublisher(), [0.0]
        sweep = sweeper(store, recorder, after_s=lambda: clock[0])
        report = await sweep.sweep()
        assert (report.outstanding, report.published, recorder.items) == (0, 0, [])  # in grace
        clock[0] = GRACE_S + 1
        report = await sweep.sweep()
        assert (report.outstanding, report.swept, report.published) == (1, True, 1)
        [command] = commands(recorder)
        assert (command.email, command.preference_id, command.side, command.opted_in,
                command.origin_time) == (ann.email, PREF, "dotdigital", False, T)
        [first] = recorder.items
        assert (first.exchange, first.routing_key) == (
            WRITES_EXCHANGE, Topology.writes_key("acme", "dotdigital",
                                                 shard_of(ann.email, SHARDS)))
        # swept: not again before the back-off, then again with the same message id
        clock[0] = GRACE_S + 2
        assert (await sweep.sweep()).published == 0
        clock[0] = GRACE_S + 1 + INTERVAL_S + 1
        assert (await sweep.sweep()).published == 1
        assert [o.message_id for o in recorder.items] == [first.message_id] * 2
        # the write landed: nothing outstanding any more
        await store.save([(1, waiting_for(ann, dotdigital=False), None)])
        clock[0] = 10 * INTERVAL_S
        report = await sweep.sweep()
        assert (report.outstanding, report.published) == (0, 0)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_suppressed_contacts_are_left_alone_and_unread_dotdigital_waits(
        backend: str, tmp_path: Path) -> None:
    async with ledger(backend, tmp_path) as store:
        ann, bob, carl = (key(f"{n}@example.com") for n in ("ann", "bob", "carl"))
        await store.save([(None, waiting_for(k, dotdigital=None), None)
                          for k in (ann, bob, carl)])
        await store.save_contacts([ContactState(account="acme", email=ann.email,
                                                status="Unsubscribed", since=T)])
        # carl's preference has been read completely in his shard since he became eligible
        await store.upsert_records("acme", [RecordRef(record_type="contact", record_id="r-carl",
                                                      email=carl.email)])
        await store.mark_eligible("acme", ["r-carl"])
        await store.set_checkpoint(
            "acme", f"reconciler:read:{PREF}:{shard_of(carl.email, SHARDS)}",
            (datetime.now(UTC) + timedelta(seconds=1)).isoformat())
        if shard_of(bob.email, SHARDS) == shard_of(carl.email, SHARDS):
            pytest.fail("the test needs bob and carl in different shards")
        recorder = CapturingPublisher()
        report = await sweeper(store, recorder, after_s=lambda: GRACE_S + 1).sweep()
        assert report.outstanding == 2  # ann's write is parked on purpose
        [command] = commands(recorder)
        assert (command.email, command.side, command.covered) == (carl.email, "dotdigital", True)
        # bob's write waits for the complete read of his preference, like the reconciler's
        assert report.deferred == 1
        assert await store.deferred_emails("acme", PREF) == [bob.email]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_one_replica_sweeps_an_account_at_a_time(backend: str, tmp_path: Path) -> None:
    async with ledger(backend, tmp_path) as store:
        await store.save([(None, waiting_for(key("ann@example.com"), dotdigital=True), None)])
        first, second = CapturingPublisher(), CapturingPublisher()
        late = GRACE_S + 1
        assert (await sweeper(store, first, holder="a", after_s=lambda: late).sweep()).swept
        report = await sweeper(store, second, holder="b", after_s=lambda: late).sweep()
        assert (report.outstanding, report.swept, second.items) == (1, False, [])
        assert len(first.items) == 1


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_key_found_settled_leaves_the_index(backend: str, tmp_path: Path) -> None:
    async with ledger(backend, tmp_path) as store:
        ann = key("ann@example.com")
        await store.save([(None, waiting_for(ann, dotdigital=False), None)])
        # rows the index kept although the state is settled (as an index built while the
        # state was being saved may leave one), or gone (a ledger emptied by hand)
        async with store._transaction() as db:  # type: ignore[attr-defined]
            for email in (ann.email, "gone@example.com"):
                await db.execute("INSERT INTO outstanding_keys (account, email, preference_id, "
                                 "revision, opted_in, origin_time, since, due_at, sweeps) "
                                 "VALUES ('acme', ?, ?, 1, 0, 0, 0, 0, 0)", (email, PREF))
        recorder = CapturingPublisher()
        report = await sweeper(store, recorder, after_s=lambda: GRACE_S + 1).sweep()
        assert (report.outstanding, report.published, report.settled) == (2, 0, 2)
        report = await sweeper(store, recorder, after_s=lambda: GRACE_S + 1).sweep()
        assert report.outstanding == 0


def test_the_sweep_is_set_in_the_config(tmp_path: Path) -> None:
    path = tmp_path / "prefsync.toml"
    path.write_text(GOOD)
    assert load_config(path, env=ENV).sweep == SweepConfig(interval_s=300.0, grace_s=120.0)
    path.write_text(GOOD + "[sweep]\ninterval_s = 60\ngrace_s = 30.5\n")
    assert load_config(path, env=ENV).sweep == SweepConfig(interval_s=60.0, grace_s=30.5)
    path.write_text(GOOD + "[sweep]\ninterval_s = 0\n")
    with pytest.raises(ConfigError, match=r"sweep\.interval_s"):
        load_config(path, env=ENV)


# --- end to end ----------------------------------------------------------------------------
def gauge(name: str, account: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"service": "reconciler", "account": account})


@pytest.mark.slow
async def test_a_write_whose_command_was_lost_is_swept_and_lands(tmp_path: Path) -> None:
    async with make_world(tmp_path, records=20) as world:
        with world.config_path.open("a") as config:
            config.write("\n[sweep]\ninterval_s = 0.5\ngrace_s = 1\n")
        world.config = load_config(world.config_path, env=world.env)
        await world.start(("dynamics-poller", "ec-poller", "reconciler"))
        await world.start(("writer",))
        assert (await world.sync())["failed"] == 0
        writer = world.services.pop()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer

        person, preference = world.people[3], world.preferences[0]
        _, before = await world.values(person.email, preference.id)
        wanted = not before if before is not None else False
        await world.edit_dynamics(person.email, preference.id, wanted)
        await request_sync(config=world.config, account=world.account)
        target = PreferenceKey(account=world.account, email=person.email,
                               preference_id=preference.id)
        queues = [Topology.writes_queue(world.account, side, shard)
                  for side in ("dynamics", "dotdigital")
                  for shard in range(world.config.broker.shards)]
        async with open_store(world.config.store.url) as store, \
                await aio_pika.connect(BROKER_URL) as connection:
            channel = await connection.channel()

            async def reconciled() -> bool:
                state = (await store.load([target])).get(target)
                return (state is not None and state.register is not None
                        and state.register.opted_in == wanted)

            async def write_queued() -> bool:
                queue = Topology.writes_queue(world.account, "dotdigital",
                                              shard_of(person.email, world.config.broker.shards))
                declared = await channel.declare_queue(queue, passive=True)
                return (declared.declaration_result.message_count or 0) > 0

            await until(reconciled, timeout_s=60, what="the change is reconciled")
            await until(write_queued, timeout_s=60, what="its write is published")
            # The command is lost: the key is outstanding, nothing in flight brings it over.
            for queue in queues:
                await (await channel.declare_queue(queue, passive=True)).purge()

        # the sweep sets the gauge at its interval, telling no one: it is looked at meanwhile
        shown = asyncio.create_task(until(
            lambda: (gauge("prefsync_outstanding_keys", world.account) or 0.0) >= 1,
            timeout_s=60, every=0.02, what="the metric showing the outstanding key"))
        try:
            await world.start(("writer",))

            async def landed() -> bool:
                return await world.values(person.email, preference.id) == ({wanted}, wanted)

            await until(landed, timeout_s=60, every=0.25, what="the write published again lands")
            assert shown.done(), "the metric never showed the outstanding key"
            await shown
            await until(lambda: gauge("prefsync_outstanding_keys", world.account) == 0,
                        timeout_s=60, what="the metric shows nothing outstanding")
            assert gauge("prefsync_outstanding_oldest_seconds", world.account) == 0
        finally:
            shown.cancel()
