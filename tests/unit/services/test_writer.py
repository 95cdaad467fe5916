"""The dotdigital writer over the in-memory broker, against the dotdigital simulator over a real
socket: commands are written and recorded before the ack; a malformed message is dead-lettered
apart from the commands beside it; a batch that fails after its commit is redelivered and
recognised as done (no second write); an opt-in the read before a write brings back after
dotdigital's clock was put back, which a fold already decided, sends no write again; a write
that would wait out a vendor pause past its read's freshness is not sent; an opt-out's window
ends where the measured clock places the answer, an opt-in's at the answer's Date header; a
write throttled when it was sent again after its answer was lost is not taken as unsent; an
opt-in taken for the echo of a write that was then never sent is decided again, as a
person's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from common import domain
from common.domain import HistoryEntry, KeyState, Known, Observation, PreferenceKey, Register
from common.domain.rows import command_row, key_tuple
from common.domain.time_base import OffsetSample
from common.messaging.abc import REASON, Outgoing
from common.messaging.envelope import WriteCommand
from common.messaging.publishing import envelopes_by_shard
from common.messaging.resilience import TransientFailure
from common.messaging.topology import WRITES_EXCHANGE, Topology
from common.ops import failpoints
from common.store.interface import StoreUnavailable
from common.vendors.base import ThrottledError, TransportError
from common.vendors.clock_skew import TimeBase, measure_clock, record_samples
from common.vendors.dotdigital.client import DotdigitalClient
from common.vendors.dotdigital.feed import EPOCH
from services.writer.dotdigital import READ_FRESH_S, DotdigitalSink
from services.writer.pipeline import Writer
from services.writer.sink import WriteOutcome
from tests.unit.services.support import ACCOUNT, SHARDS, Bed, Failing, FailsOnce, bed
from tests.unit.vendors.support import DD_ACCOUNT, SimControl, dotdigital_config, dotdigital_sim

pytestmark = pytest.mark.anyio


@dataclass
class Scene:
    bed: Bed
    sim: SimControl
    client: DotdigitalClient
    emails: list[str]
    preference: int

    def writer(self, *, store: Any = None, client: DotdigitalClient | None = None,
               publisher: Any = None) -> Writer:
        """A writer to dotdigital over the bed's ledger (or ``store``), through the scene's
        client (or ``client``), publishing to the bed's broker (or ``publisher``)."""
        store = store or self.bed.store
        sink = DotdigitalSink(account=ACCOUNT, store=store, client=client or self.client,
                              shards=SHARDS)
        return Writer(account=ACCOUNT, sink=sink, store=store,
                      publisher=publisher or self.bed.broker, shards=SHARDS,
                      dead_letters=self.bed.dead_letterer("writer"))

    def queues(self) -> list[str]:
        return [Topology.writes_queue(ACCOUNT, "dotdigital", s) for s in range(SHARDS)]

    async def registers(self, opted_in: bool) -> list[Outgoing]:
        """A Dynamics change of every email, reconciled into the ledger; the write commands
        the reconciler sends for them."""
        now = datetime.now(UTC)
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # as messages carry it
        commands = []
        for email in self.emails:
            key = PreferenceKey(account=ACCOUNT, email=email, preference_id=self.preference)
            decision = domain.reconcile(None, Observation(
                key=key, side="dynamics", opted_in=opted_in, origin_time=now, version=1,
                change_id=f"dyn:{email}:1"))
            await self.bed.store.save([(None, decision.state, None)])
            commands.append(WriteCommand(email=email, preference_id=self.preference,
                                         side="dotdigital", opted_in=opted_in, origin_time=now,
                                         origin_side="dynamics", change_id=f"dyn:{email}:1"))
        return envelopes_by_shard(account=ACCOUNT, source="reconciler", type="write-commands",
                                  changes=commands, shards=SHARDS, run_id=None,
                                  id_seed="w", route="writes", side="dotdigital")

    async def state(self, email: str) -> KeyState:
        key = PreferenceKey(account=ACCOUNT, email=email, preference_id=self.preference)
        found: KeyState = (await self.bed.store.load([key]))[key]
        return found

    async def writes(self) -> int:
        calls = (await self.sim.stats())["calls"]
        return sum(n for k, n in calls.items()
                   if k.startswith(("PUT /v2/contacts", "PUT /contacts/v3/import")))

    async def opted_in(self, email: str) -> bool:
        return (await self.client.subscriptions(email)).by_preference()[self.preference]\
            .is_opted_in


@asynccontextmanager
async def scene(tmp_path: Path) -> AsyncIterator[Scene]:
    async with dotdigital_sim() as sim, bed(tmp_path) as b:
        # the seeded states are history: dated back, so the tests' changes are newer
        await sim.clock(offset_s=-5)
        seeded = await sim.seed(records=4, preferences=2, seed=5, account=DD_ACCOUNT)
        await sim.clock()
        async with DotdigitalClient(config=dotdigital_config(sim.url)) as client:
            preference = int(seeded["preferences"][0])
            # the ec-poller has read the preference's feed in full
            started = await client.server_time()
            await b.store.set_checkpoint(ACCOUNT, f"dotdigital:opt-ins:{preference}",
                                         orjson.dumps({"since": started.isoformat(),
                                                       "previous": EPOCH.isoformat()}).decode())
            yield Scene(bed=b, sim=sim, client=client, preference=preference,
                        emails=[e.lower() for e in seeded["emails"][:3]])


def consume(s: Scene, handler: Any) -> None:
    for queue in s.queues():
        s.bed.consume(queue, handler, service="writer")


async def test_commands_are_written_and_recorded_before_the_ack(tmp_path: Path) -> None:
    async with scene(tmp_path) as s:
        await s.bed.broker.publish_many(await s.registers(opted_in=False))
        consume(s, s.writer().handle)
        await s.bed.drained(*s.queues())
        await written_once(s, s.emails, opted_in=False)


async def written_once(s: Scene, emails: list[str], *, opted_in: bool) -> None:
    """Each email holds ``opted_in`` in dotdigital, its one write recorded as done (none left
    in flight), and nothing was dead-lettered."""
    for email in emails:
        assert await s.opted_in(email) is opted_in
        [write] = (await s.state(email)).writes.dotdigital
        assert not write.in_flight
    assert s.bed.dead_letters() == []


async def test_a_malformed_message_is_dead_lettered_and_the_commands_beside_it_written(
        tmp_path: Path) -> None:
    async with scene(tmp_path) as s:
        good = await s.registers(opted_in=True)
        bad = Outgoing(exchange=WRITES_EXCHANGE, routing_key=good[0].routing_key,
                       body=b"not json", message_id="bad")
        await s.bed.broker.publish_many([bad, *good])
        consume(s, s.writer().handle)
        await s.bed.drained(*s.queues())
        [dead] = s.bed.dead_letters()
        assert (dead.message_id, dead.headers["x-prefsync-kind"]) == ("bad", "malformed")
        assert dead.headers[REASON]
        for email in s.emails:
            assert await s.opted_in(email) is True


async def test_a_batch_failing_after_its_commit_is_redelivered_and_not_written_twice(
        tmp_path: Path) -> None:
    async with scene(tmp_path) as s:
        await s.bed.broker.publish_many(await s.registers(opted_in=False))
        before = await s.writes()
        # the broker goes away after the ledger commit, past the hold: the batch goes back
        handler = Failing(s.writer().handle, after=True, times=1_000,
                          error=TransientFailure("the broker is down", dependency="broker"))
        consume(s, handler)
        async with asyncio.timeout(15):
            while not any(d.redelivered for batch in handler.calls for d in batch):
                await s.bed.broker.changed()
        handler.left = 0
        await s.bed.drained(*s.queues())
        # retried in place, then redelivered: the commands are satisfied in the ledger after
        # the first attempt, so each contact was written once (one preferences PUT each)
        assert await s.writes() - before == len(s.emails)
        for email in s.emails:
            assert await s.opted_in(email) is False
            assert len((await s.state(email)).writes.dotdigital) == 1
        assert s.bed.dead_letters() == []


class BeginWatch:
    """The bed's ledger, telling when a round's writes are begun (a write batch)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.begun = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def begin_writes(self, batch: Any) -> None:
        await self._store.begin_writes(batch)
        self.begun.set()


class BeginFailsOnce(BeginWatch):
    """The first begin fails as a ledger that is briefly locked does."""

    async def begin_writes(self, batch: Any) -> None:
        if not self.begun.is_set():
            self.begun.set()
            raise StoreUnavailable("the ledger is locked", transient=True)
        await super().begin_writes(batch)


class FeedAfterBegin(DotdigitalClient):
    """Answers the opt-ins feed only once ``begun`` is set; ``answered_after_begin`` says
    whether every feed read was held for it."""

    begun: asyncio.Event
    answered_after_begin = True

    async def iter_opt_in_entries(self, preference_id: int, since: datetime, *,
                                  wanted: Callable[[str], bool] | None = None
                                  ) -> AsyncIterator[list[Any]]:
        try:
            await asyncio.wait_for(self.begun.wait(), timeout=5)
        except TimeoutError:
            self.answered_after_begin = False
        async for page in super().iter_opt_in_entries(preference_id, since, wanted=wanted):
            yield page


async def test_a_rounds_writes_are_begun_while_the_feed_is_read(tmp_path: Path) -> None:
    async with scene(tmp_path) as s:
        store = BeginWatch(s.bed.store)
        async with FeedAfterBegin(config=dotdigital_config(s.sim.url)) as client:
            client.begun = store.begun
            await s.bed.broker.publish_many(await s.registers(opted_in=False))
            consume(s, s.writer(store=store, client=client).handle)
            await s.bed.drained(*s.queues())
        # the feed was still being read when the writes were recorded as in flight
        assert client.answered_after_begin
        await written_once(s, s.emails, opted_in=False)


async def test_a_write_the_feed_read_makes_needless_is_not_sent_and_its_record_goes(
        tmp_path: Path) -> None:
    async with scene(tmp_path) as s:
        commands = await s.registers(opted_in=False)
        # the person opts out in dotdigital themselves, after the ec-poller's last read: the
        # writer's feed read finds dotdigital holding the value already
        held, *others = s.emails
        await s.client.update_contact_preferences(held, {s.preference: False})
        before = await s.writes()
        await s.bed.broker.publish_many(commands)
        consume(s, s.writer().handle)
        await s.bed.drained(*s.queues())
        assert await s.writes() - before == len(others)
        state = await s.state(held)
        # begun beside the read, then dropped: no write record stays in flight or is kept
        assert state.writes.dotdigital == ()
        assert state.known.dotdigital is not None and state.known.dotdigital.opted_in is False
        await written_once(s, others, opted_in=False)


async def test_a_begin_failing_beside_the_feed_read_fails_the_round_which_is_retried(
        tmp_path: Path) -> None:
    async with scene(tmp_path) as s:
        store = BeginFailsOnce(s.bed.store)
        sink = DotdigitalSink(account=ACCOUNT, store=store, client=s.client, shards=SHARDS)
        writer = Writer(account=ACCOUNT, sink=sink, store=store, publisher=s.bed.broker,
                        shards=SHARDS, dead_letters=s.bed.dead_letterer("writer"))
        await s.bed.broker.publish_many(await s.registers(opted_in=False))
        before = (await s.sim.stats())["writes_applied"]
        consume(s, writer.handle)
        await s.bed.drained(*s.queues())
        assert store.begun.is_set()
        # retried in place, not dead-lettered; nothing was sent by the round that failed
        await written_once(s, s.emails, opted_in=False)
        assert (await s.sim.stats())["writes_applied"] - before == len(s.emails)


class FeedFailsAfterBegin(DotdigitalClient):
    """The first read of the opt-ins feed fails (a lost connection) once the round's writes
    are begun."""

    begun: asyncio.Event
    failed = False

    async def iter_opt_in_entries(self, preference_id: int, since: datetime, *,
                                  wanted: Callable[[str], bool] | None = None
                                  ) -> AsyncIterator[list[Any]]:
        if not self.failed:
            await self.begun.wait()
            self.failed = True
            raise TransportError(vendor="dotdigital", detail="connection reset")
        async for page in super().iter_opt_in_entries(preference_id, since, wanted=wanted):
            yield page


class DropWatch(BeginWatch):
    """The bed's ledger, counting begins and keeping the write batches ended by a save that
    recorded no write (closed as never sent)."""

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.begun_keys: list[tuple[str, set[Any]]] = []  # each batch's id and keys, in order
        self.dropped: list[str] = []

    async def begin_writes(self, batch: Any) -> None:
        self.begun_keys.append((batch.id, set(batch.keys)))
        await super().begin_writes(batch)

    async def save_rows(self, changes: Any, **parts: Any) -> Any:
        if not any(e.decision == "written" for e in parts.get("entries", ())):
            self.dropped.extend(batch_id for _, batch_id in parts.get("ended_batches", ()))
        return await self._store.save_rows(changes, **parts)


async def test_a_round_failing_before_its_vendor_call_drops_the_writes_it_began(
        tmp_path: Path) -> None:
    """common.store.write_batches, rule 6: the round's writes are begun beside the feed read,
    and the read fails; nothing was sent, so their records in flight go (left, they would
    take a person's change of the same value for their echo for minutes). The retry begins
    its own and writes once."""
    async with scene(tmp_path) as s:
        store = DropWatch(s.bed.store)
        async with FeedFailsAfterBegin(config=dotdigital_config(s.sim.url)) as client:
            client.begun = store.begun
            await s.bed.broker.publish_many(await s.registers(opted_in=False))
            before = (await s.sim.stats())["writes_applied"]
            consume(s, s.writer(store=store, client=client).handle)
            await s.bed.drained(*s.queues())
        assert client.failed and len(store.dropped) == 1
        ids = [batch_id for batch_id, _ in store.begun_keys]
        dropped_keys = store.begun_keys[ids.index(store.dropped[0])][1]
        # the retry began those writes again: they were not in flight any more
        again = set().union(*(keys for _, keys in store.begun_keys[ids.index(store.dropped[0])
                                                                   + 1:]))
        assert dropped_keys and dropped_keys <= again
        await written_once(s, s.emails, opted_in=False)
        assert (await s.sim.stats())["writes_applied"] - before == len(s.emails)


class SavedBeside(BeginWatch):
    """The bed's ledger, where another process saves every key of a round's commit just
    before its first save (as the reconciler does, folding the round's own writes read back
    by the ec-poller meanwhile); it counts those rounds, the saves in the open and the holds
    (``holds``: whether the ledger holds key states, as SQLite does, or not, as PostgreSQL)."""

    def __init__(self, store: Any, *, holds: bool) -> None:
        super().__init__(store)
        self._holds = holds
        self._saved: set[Any] = set()
        self.rounds = 0
        self.saves = 0
        self.held = 0

    async def save_rows(self, changes: Any, **parts: Any) -> Any:
        self.saves += 1
        keys = [key for _, key, _ in changes]
        if self._saved.isdisjoint(keys):  # a round's first save
            self.rounds += 1
            stored = await self._store.load_rows(keys)
            await self._store.save_rows([(row.revision, k, row) for k, row in stored.items()])
        self._saved.update(keys)
        return await self._store.save_rows(changes, **parts)

    def holding(self) -> Any:
        if not self._holds:
            return None
        self.held += 1
        return self._store.holding()


@pytest.mark.parametrize("holds", [True, False], ids=["held", "not-held"])
async def test_a_commit_that_meets_a_conflict_saves_once_more_and_held_if_it_can(
        tmp_path: Path, holds: bool) -> None:
    """A round's commit whose keys another process saved after the round loaded them meets a
    conflict; it then loads them again and saves on top of that save, held by a ledger that
    can hold its key states (no other process saves until it ends, so once more is enough),
    in the open by one that cannot (tried again until it settles)."""
    async with scene(tmp_path) as s:
        store = SavedBeside(s.bed.store, holds=holds)
        await s.bed.broker.publish_many(await s.registers(opted_in=False))
        consume(s, s.writer(store=store).handle)
        await s.bed.drained(*s.queues())
        await written_once(s, s.emails, opted_in=False)
        assert store.rounds >= 1
        if holds:  # each round: its first save met the conflict, the second was held
            assert store.saves == store.held == store.rounds
        else:      # each round: its first save met the conflict, the second went through
            assert (store.saves, store.held) == (2 * store.rounds, 0)
        for email in s.emails:
            # the reconciler's save, the other process's, then the commit's
            assert (await s.state(email)).revision == 3


class LoadWatch(BeginWatch):
    """The bed's ledger, noting the keys each ``load_rows`` asks for."""

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.loaded: list[set[Any]] = []

    async def load_rows(self, keys: Any) -> Any:
        keys = list(keys)
        self.loaded.append(set(keys))
        return await self._store.load_rows(keys)


async def test_the_commit_loads_only_the_keys_the_read_brought(tmp_path: Path) -> None:
    """A round's commit takes its commands' rows as the round loaded them, and loads only the
    keys the read brought beside them (another preference of a contact read); what was read of
    those is folded in and saved."""
    async with scene(tmp_path) as s:
        store = LoadWatch(s.bed.store)
        writer = s.writer(store=store)
        await s.registers(opted_in=False)  # the commands' keys are stored
        email = s.emails[0]
        command = domain.WriteCommand(
            key=PreferenceKey(account=ACCOUNT, email=email, preference_id=s.preference),
            side="dotdigital", opted_in=False, origin_time=datetime.now(UTC),
            origin_side="dynamics", change_id=f"dyn:{email}:1")
        other = PreferenceKey(account=ACCOUNT, email=email, preference_id=s.preference + 1)
        outcome = WriteOutcome()
        outcome.observe(Observation(key=other, side="dotdigital", opted_in=True,
                                    origin_time=datetime.now(UTC), change_id="ec:1:other"))
        loaded = await s.bed.store.load_rows([key_tuple(command.key)])
        assert loaded  # as the round loaded it
        await writer._commit_outcome({command.key: command},
                                     {command.key: command_row(command)}, {}, outcome,
                                     states=dict(loaded), contacts={}, batches={})
        assert store.loaded == [{key_tuple(other)}]
        saved = (await s.bed.store.load([other]))[other]
        held = saved.known.dotdigital
        assert held is not None and held.opted_in


@pytest.mark.parametrize("decided_before", [True, False])
async def test_an_opt_in_read_again_after_the_clock_was_put_back_is_not_written_over_again(
        tmp_path: Path, decided_before: bool) -> None:
    """dotdigital's clock ran 30 s ahead when a person opted in there, and was put back just
    after; a newer opt-out in Dynamics won, and the ledger holds our write of it as what
    dotdigital holds. The writer's read before a write (of the command sent again) brings the
    opt-in back, as a read begun before our write landed does: a stamp both epochs of the
    clock could have made, placed as their hull, later than our write. Decided before, it
    changes nothing and the command is needless; read for the first time, it is taken for
    what dotdigital holds and the opt-out is written again. (The writer folds what it reads
    by the reconciler's rules: rule 3 of common.domain.reconcile.)"""
    async with scene(tmp_path) as s:
        email = s.emails[0]
        key = PreferenceKey(account=ACCOUNT, email=email, preference_id=s.preference)
        await s.sim.clock(offset_s=30)
        await s.client.update_contact_preferences(email, {s.preference: True})
        read = await s.client.subscriptions(email)
        await s.sim.clock()
        stamp = read.by_preference()[s.preference].modified
        made = stamp - timedelta(seconds=30)  # on our clock
        ahead = [OffsetSample(at=made - timedelta(seconds=30 - i), low_s=29.9, high_s=30.1)
                 for i in range(3)]
        put_back = [OffsetSample(at=made + timedelta(milliseconds=10 * i), low_s=-0.1,
                                 high_s=0.1) for i in range(1, 4)]
        clock = await record_samples(s.bed.store, account=ACCOUNT, side="dotdigital",
                                     samples=[*ahead, *put_back])
        assert clock.estimate is not None and clock.estimate.earlier  # it stepped
        opt_out = Observation(key=key, side="dynamics", opted_in=False,
                              origin_time=made + timedelta(seconds=1), version=2,
                              change_id=f"dyn:{email}:2")
        ours = Known(opted_in=False, as_of=made + timedelta(seconds=2))
        state = KeyState(key=key, register=Register.of(opt_out)).with_known(
            "dynamics", Known.of(opt_out)).with_known("dotdigital", ours)
        first_read = HistoryEntry(
            account=ACCOUNT, email=email, preference_id=s.preference, side="dotdigital",
            opted_in=True, origin_time=stamp,
            change_id=f"ec:{read.contact.id}:{s.preference}:{stamp.isoformat()}",
            decision="tie_opt_in_lost", recorded_at=made)
        await s.bed.store.save([(None, state, None)],
                               history=[first_read] if decided_before else [])
        command = WriteCommand(email=email, preference_id=s.preference, side="dotdigital",
                               opted_in=False, origin_time=opt_out.origin_time,
                               origin_side="dynamics", change_id=opt_out.change_id)
        before = await s.writes()
        await s.bed.broker.publish_many(envelopes_by_shard(
            account=ACCOUNT, source="reconciler", type="write-commands", changes=[command],
            shards=SHARDS, run_id=None, id_seed="again", route="writes", side="dotdigital"))
        consume(s, s.writer().handle)
        await s.bed.drained(*s.queues())
        if decided_before:
            assert await s.writes() == before
            assert (await s.state(email)).known.dotdigital == ours
        else:
            assert await s.writes() == before + 1
            assert not await s.opted_in(email)
        assert s.bed.dead_letters() == []


@pytest.mark.parametrize("wait", ["pause", "budget"])
@pytest.mark.parametrize("plan", ["put", "import"])
async def test_a_write_that_would_wait_out_a_pause_past_its_reads_freshness_is_not_sent(
        tmp_path: Path, plan: str, wait: str) -> None:
    """Rule 6 of services.writer.dotdigital: dotdigital asked the client to pause (a 429's
    Retry-After), or the client spent its request budget (the Low tier's 35 calls a minute),
    for longer than the read before the write stays fresh; the write is not sent after the
    wait: nothing is recorded as written (the round's records go, not left in flight) and the
    round is to be retried, reading again first."""
    async with scene(tmp_path) as s, DotdigitalClient(config=dotdigital_config(
            s.sim.url, calls_per_minute=35)) as low_tier:
        client = s.client if wait == "pause" else low_tier
        await s.registers(opted_in=False)
        sink = DotdigitalSink(account=ACCOUNT, store=s.bed.store, client=client,
                              shards=SHARDS)
        emails = s.emails if plan == "import" else s.emails[:1]
        todo = {PreferenceKey(account=ACCOUNT, email=e, preference_id=s.preference):
                domain.WriteCommand(key=PreferenceKey(account=ACCOUNT, email=e,
                                                      preference_id=s.preference),
                                    side="dotdigital", opted_in=False,
                                    origin_time=datetime.now(UTC), origin_side="dynamics",
                                    change_id=f"dyn:{e}:1")
                for e in emails}
        await client.preferences()  # the tree at hand: one contact is a PUT, three an import
        if wait == "pause":
            client.pacer.pause_for(60)  # inside the call's own deadline, past the freshness
        else:
            for _ in range(client.pacer.budget.spendable - 1):  # the minute's budget spent
                await client.server_time()
        before = (await s.sim.stats())["writes_applied"]
        started = time.monotonic()
        outcome = WriteOutcome()
        await sink.write_dotdigital(todo, outcome, datetime.now(UTC), {},
                                    send_by=time.monotonic() + READ_FRESH_S)
        assert time.monotonic() - started < READ_FRESH_S  # not waited out
        assert outcome.transient is not None and "not sent" in outcome.transient
        assert not outcome.written and not outcome.failed
        assert (await s.sim.stats())["writes_applied"] == before


@pytest.mark.parametrize("measured", [True, False])
async def test_an_opt_outs_window_ends_where_the_measured_clock_places_the_answer(
        tmp_path: Path, measured: bool) -> None:
    """common.domain.write_window_end: a round writes an opt-in and an opt-out to dotdigital.
    The opt-in's window ends at the answers' Date header (whole seconds) and a second, as
    sure as it gets; the opt-out's no later than where the measured clock placed the moment
    the answer was received, so a person's opt-out just after it is not taken for our echo.
    With the clock not measured, both end at the Date header."""
    async with scene(tmp_path) as s:
        sink = DotdigitalSink(account=ACCOUNT, store=s.bed.store, client=s.client,
                              shards=SHARDS)
        keys = {value: PreferenceKey(account=ACCOUNT, email=email, preference_id=s.preference)
                for value, email in ((True, s.emails[0]), (False, s.emails[1]))}
        todo = {key: domain.WriteCommand(key=key, side="dotdigital", opted_in=value,
                                         origin_time=datetime.now(UTC),
                                         origin_side="dynamics", change_id=f"dyn:{value}")
                for value, key in keys.items()}
        outcome = WriteOutcome()
        if measured:
            estimate = await measure_clock(s.bed.store, account=ACCOUNT, side="dotdigital",
                                           client=s.client)
            assert estimate is not None
            outcome.time_base = TimeBase(estimates={"dotdigital": estimate})
        await s.client.preferences()
        start = await s.client.server_time()
        await sink.write_dotdigital(todo, outcome, start, {})
        placed_now = outcome.time_base.on_their_clock("dotdigital", datetime.now(UTC))[1]
        (opt_in,), (opt_out,) = outcome.written[keys[True]], outcome.written[keys[False]]
        answered = opt_in[2]
        assert answered.microsecond == 0  # a Date header's whole second, and one more
        assert start <= opt_out[2] <= answered
        if measured:
            assert opt_out[2] <= placed_now
        else:
            assert opt_out[2] == answered


async def test_a_write_throttled_when_sent_again_after_its_answer_was_lost_may_have_landed(
        tmp_path: Path) -> None:
    """Rule 5 of services.writer.dotdigital: dotdigital applies a preferences PUT and the
    connection drops before its answer; sent again on a fresh connection (by aiohttp, as RFC
    9112 allows for a PUT), it is refused with a 429 whose pause outlasts the read's freshness.
    The write did land: the round fails as a write that may have landed does (its record stays
    in flight, the retry reads dotdigital first), never as one surely not sent."""
    async with scene(tmp_path) as s:
        key = PreferenceKey(account=ACCOUNT, email=s.emails[0], preference_id=s.preference)
        todo = {key: domain.WriteCommand(key=key, side="dotdigital", opted_in=False,
                                         origin_time=datetime.now(UTC),
                                         origin_side="dynamics", change_id="dyn:1")}
        sink = DotdigitalSink(account=ACCOUNT, store=s.bed.store, client=s.client,
                              shards=SHARDS)
        await s.client.preferences()  # the tree at hand: one contact is a PUT
        before = (await s.sim.stats())["writes_applied"]
        await s.sim.faults(lost_answers={"PUT /v2/contacts": 1},
                           throttle={"limit": 1, "window_s": 60})
        outcome = WriteOutcome()
        with pytest.raises(ThrottledError) as raised:
            await sink.write_dotdigital(todo, outcome, datetime.now(UTC), {},
                                        send_by=time.monotonic() + READ_FRESH_S)
        assert raised.value.earlier_maybe_delivered
        assert outcome.transient is None and not outcome.written  # not taken as unsent
        assert (await s.sim.stats())["writes_applied"] == before + 1  # it did land


class FeedHeld(DotdigitalClient):
    """Answers the opt-ins feed only once ``release`` is set."""

    release: asyncio.Event

    async def iter_opt_in_entries(self, preference_id: int, since: datetime, *,
                                  wanted: Callable[[str], bool] | None = None
                                  ) -> AsyncIterator[list[Any]]:
        await self.release.wait()
        async for page in super().iter_opt_in_entries(preference_id, since, wanted=wanted):
            yield page


class FeedHeldThenFails(FeedHeld):
    """Answers the opt-ins feed only once ``release`` is set, and the first time not at all:
    the connection is lost."""

    failed = False

    async def iter_opt_in_entries(self, preference_id: int, since: datetime, *,
                                  wanted: Callable[[str], bool] | None = None
                                  ) -> AsyncIterator[list[Any]]:
        await self.release.wait()
        if not self.failed:
            self.failed = True
            raise TransportError(vendor="dotdigital", detail="connection reset")
        async for page in super().iter_opt_in_entries(preference_id, since, wanted=wanted):
            yield page


@pytest.mark.parametrize(("feed", "crash"), [(FeedHeld, False), (FeedHeldThenFails, False),
                                             (FeedHeld, True), (FeedHeldThenFails, True)],
                         ids=["read", "read-failed", "read-then-crash-after-commit",
                              "read-failed-then-correction-lost"])
async def test_an_opt_in_taken_for_the_echo_of_a_write_never_sent_is_decided_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, feed: type[FeedHeld],
        crash: bool) -> None:
    """Rule 8 of common.domain.reconcile (a chaos run's missing opt-in): our write of a
    Dynamics opt-in to dotdigital is begun beside the round's read, which takes long. Meanwhile
    a newer Dynamics opt-out becomes the register, and the person opts in in dotdigital: the
    reconciler takes that for our write's echo (a same-value opt-in while it is in flight).
    The read then finds dotdigital holding the opt-in (``read``), or fails (``read-failed``:
    the round ends before its vendor call, common.store.write_batches, rule 6), so the write
    is never sent: where it is closed, the opt-in is decided again, as the person's, and wins;
    Dynamics is to get it. ``read-then-crash-after-commit``: the writer stops at the failpoint
    ``writer.after-commit`` of the round that decided it (nothing published yet); the
    redelivered command finds the key moved and publishes the correction.
    ``read-failed-then-correction-lost``: the round that failed before its vendor call closed
    its write, and the correction's publish failed (the window between that commit and the
    publish); the redelivered command publishes it."""
    crashed: list[str] = []
    if crash and feed is FeedHeld:
        async def reached(name: str) -> None:
            if name == "writer.after-commit" and not crashed:
                crashed.append(name)
                raise TransientFailure("stopped at writer.after-commit", dependency="dotdigital")

        monkeypatch.setattr(failpoints, "reached", reached)
    async with scene(tmp_path) as s:
        email = s.emails[0]
        key = PreferenceKey(account=ACCOUNT, email=email, preference_id=s.preference)
        now = datetime.now(UTC).replace(microsecond=0)
        opt_in = Observation(key=key, side="dynamics", opted_in=True,
                             origin_time=now - timedelta(seconds=10), version=1,
                             change_id=f"dyn:{email}:1")
        await s.bed.store.save([(None, domain.reconcile(None, opt_in).state, None)])
        command = WriteCommand(email=email, preference_id=s.preference, side="dotdigital",
                               opted_in=True, origin_time=opt_in.origin_time,
                               origin_side="dynamics", change_id=opt_in.change_id)
        store = BeginWatch(s.bed.store)
        publisher = (FailsOnce(s.bed.broker, method="publish_many",
                               error=ConnectionError("the broker connection was lost"))
                     if crash and feed is not FeedHeld else None)
        async with feed(config=dotdigital_config(s.sim.url)) as client:
            client.release = asyncio.Event()
            await s.bed.broker.publish_many(envelopes_by_shard(
                account=ACCOUNT, source="reconciler", type="write-commands",
                changes=[command], shards=SHARDS, run_id=None, id_seed="reopen",
                route="writes", side="dotdigital"))
            consume(s, s.writer(store=store, client=client, publisher=publisher).handle)
            await store.begun.wait()
            # as the reconciler decides, while the writer's read is held: the Dynamics opt-out
            # (5 s before now), then the person's opt-in in dotdigital, taken for our echo
            state = await s.state(email)
            assert state.writes.dotdigital and state.writes.dotdigital[0].in_flight
            opt_out = domain.reconcile(state, Observation(
                key=key, side="dynamics", opted_in=False, origin_time=now - timedelta(seconds=5),
                version=2, change_id=f"dyn:{email}:2"))
            assert opt_out.outcome is domain.Outcome.APPLIED
            await s.client.update_contact_preferences(email, {s.preference: True})
            read = await s.client.subscriptions(email)
            stamp = read.by_preference()[s.preference].modified
            echo = domain.reconcile(opt_out.state, Observation(
                key=key, side="dotdigital", opted_in=True, origin_time=stamp,
                change_id=f"ec:{read.contact.id}:{s.preference}:{stamp.isoformat()}"))
            assert echo.outcome is domain.Outcome.ECHO
            await s.bed.store.save([(state.revision, echo.state, None)])
            before = await s.writes()
            client.release.set()
            await s.bed.drained(*s.queues())
        assert await s.writes() == before  # the write was needless: never sent
        after = await s.state(email)
        assert after.writes.dotdigital == ()
        assert after.register is not None and after.register.opted_in
        assert (after.register.origin_side, after.register.origin_time) == ("dotdigital", stamp)
        assert after.pending.dynamics is not None and after.pending.dynamics.opted_in
        assert await s.opted_in(email)
        history = await s.bed.store.history(ACCOUNT, email)
        assert [(h.side, h.decision) for h in history if h.change_id.startswith("reopened")] \
            == [("dotdigital", "applied")]
        # the correction went out: Dynamics is to be opted in
        sent = [c for shard in range(SHARDS)
                for c in s.bed.commands(Topology.writes_queue(ACCOUNT, "dynamics", shard))]
        assert {(c.email, c.opted_in) for c in sent} == {(email, True)}
        assert s.bed.dead_letters() == []
        if isinstance(client, FeedHeldThenFails):
            assert client.failed  # the round that began the write failed, and was retried
        assert crashed == (["writer.after-commit"] if crash and feed is FeedHeld else [])
        assert publisher is None or publisher.failed
