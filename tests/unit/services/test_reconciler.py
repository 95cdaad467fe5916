"""The reconciler over the in-memory broker: a change is decided, committed and its write
commands published before the message is acked; a malformed message is dead-lettered apart from
its neighbours; a batch given back after a failure past its commit is redelivered and folded
again as a duplicate, its writes going out with the same message ids; a batch asks the record
directory nothing beyond its snapshot; a change parked for a suppressed contact and the
contact's resubscription in one batch: the change is folded in, not dropped. A round of several
shards' batches gives each its own outcome, and releases each shard's deferred writes. An
opt-in read again after dotdigital's clock was put back, which a fold already decided, is not
decided again: the register's value is not written once more."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from common.domain import (
    ContactState,
    HistoryEntry,
    KeyState,
    Known,
    Observation,
    PreferenceKey,
    Register,
)
from common.domain.time_base import OffsetSample
from common.messaging.abc import REASON, Delivery, Outgoing
from common.messaging.amqp import QueueConsumer
from common.messaging.envelope import ContactStatusChange, PreferenceChange
from common.messaging.middleware import Handled
from common.messaging.publishing import envelopes_by_shard, read_markers
from common.messaging.resilience import TransientFailure
from common.messaging.topology import CHANGES_EXCHANGE, Topology, shard_of
from common.store.directory import RecordRef
from common.vendors.clock_skew import record_samples
from services.reconciler.service import Reconciler
from tests.unit.services.support import ACCOUNT, SHARDS, Bed, Failing, FailsOnce, bed

pytestmark = pytest.mark.anyio
PREFERENCE = 1001
EMAIL = "ann@example.com"
SHARD = shard_of(EMAIL, SHARDS)
CHANGES = Topology.changes_queue(ACCOUNT, SHARD)
WRITES = Topology.writes_queue(ACCOUNT, "dotdigital", SHARD)
NOW = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)


def dynamics_change(opted_in: bool, *, version: int, email: str = EMAIL) -> list[Outgoing]:
    """A change the dynamics-poller read, as it publishes it."""
    return envelopes_by_shard(
        account=ACCOUNT, source="dynamics", type="preference-changes", shards=SHARDS,
        changes=[PreferenceChange(email=email, preference_id=PREFERENCE, opted_in=opted_in,
                                  origin_time=NOW + timedelta(seconds=version),
                                  version=version, change_id=f"dyn:row:{version}")],
        run_id=None, id_seed=f"poll:{version}")


def status_change(status: str, *, at: datetime, email: str = EMAIL) -> list[Outgoing]:
    """A contact's status the ec-poller read, as it publishes it."""
    return envelopes_by_shard(
        account=ACCOUNT, source="dotdigital", type="contact-status-changes", shards=SHARDS,
        changes=[ContactStatusChange(email=email, status=status, origin_time=at,
                                     change_id=f"ec-status:{status}:{at.isoformat()}")],
        run_id=None, id_seed=f"status:{status}")


async def reconciler(b: Bed) -> Reconciler:
    """The account's reconciler, once dotdigital's feed of the preference has been read in
    full in this shard (so writes to it go out at once, not deferred)."""
    await b.store.set_checkpoint(ACCOUNT, f"reconciler:read:{PREFERENCE}:{SHARD}",
                                 NOW.isoformat())
    return Reconciler(account=ACCOUNT, store=b.store, publisher=b.broker, shards=SHARDS)


async def test_a_change_is_committed_and_its_write_published_before_the_ack(
        tmp_path: Path) -> None:
    async with bed(tmp_path) as b:
        b.consume(CHANGES, (await reconciler(b)).handle, service="reconciler")
        await b.broker.publish_many(dynamics_change(True, version=1))
        await b.drained(CHANGES)
        key = PreferenceKey(account=ACCOUNT, email=EMAIL, preference_id=PREFERENCE)
        state = (await b.store.load([key]))[key]
        assert state.register is not None and state.register.opted_in
        [command] = b.commands(WRITES)
        assert (command.email, command.opted_in, command.side) == (EMAIL, True, "dotdigital")
        history = await b.store.history(ACCOUNT, EMAIL)
        assert [h.decision for h in history] == ["applied"]
        assert b.dead_letters() == []


async def test_the_shards_batches_reconciled_in_one_round_each_get_their_own_outcome(
        tmp_path: Path) -> None:
    """A round of every shard's batch (:mod:`common.messaging.rounds`): every change is
    decided and its write published, and each batch's outcome counts its own changes."""
    async with bed(tmp_path) as b:
        r = await reconciler(b)
        for shard in range(SHARDS):
            await b.store.set_checkpoint(ACCOUNT, f"reconciler:read:{PREFERENCE}:{shard}",
                                         NOW.isoformat())
        taken = await take_batches(b, [m for i in range(12) for m in dynamics_change(
            True, version=1, email=f"person{i}@example.com")])
        handled = await r.handle_round([batch for batch, _ in taken])
        for done in (release for _, release in taken):
            done.set()
        await b.drained(*(Topology.changes_queue(ACCOUNT, s) for s in range(SHARDS)))

        emails = [{c.email for d in batch for c in d.envelope.changes
                   if isinstance(c, PreferenceChange)} for batch, _ in taken]
        assert [h.counts for h in handled] == [{"applied": len(e)} for e in emails]
        written = {c.email for s in range(SHARDS)
                   for c in b.commands(Topology.writes_queue(ACCOUNT, "dotdigital", s))}
        assert written == set().union(*emails) and len(written) == 12
        assert b.dead_letters() == []


async def take_batches(b: Bed, messages: list[Outgoing]
                       ) -> list[tuple[Sequence[Delivery], asyncio.Event]]:
    """``messages`` published, and each shard's batch of them as a consumer of its own hands
    it over (in shard order), held (not acked) until its event is set; then the consumer
    stops."""
    taken: dict[int, tuple[Sequence[Delivery], asyncio.Event]] = {}
    every = asyncio.Event()
    shards = {int(m.routing_key.rsplit(".", 1)[1]) for m in messages}
    consumers: dict[int, QueueConsumer] = {}
    for shard in shards:
        async def handle(batch: Sequence[Delivery], shard: int = shard) -> None:
            assert shard not in taken, "one batch a shard"
            consumers[shard].stop()
            taken[shard] = (batch, asyncio.Event())
            if taken.keys() == shards:
                every.set()
            await taken[shard][1].wait()

        consumers[shard] = b.consume(Topology.changes_queue(ACCOUNT, shard), handle,
                                     service="reconciler")
    await b.broker.publish_many(messages)
    await every.wait()
    return [taken[shard] for shard in sorted(shards)]


async def test_a_round_of_several_shards_read_markers_releases_each_shards_deferred_writes(
        tmp_path: Path) -> None:
    """The writes to dotdigital deferred until a complete read of the preference is
    reconciled go out when its marker comes, in the marker's own shard: a round holding the
    markers of every shard marks and releases each (not only the first batch's)."""
    async with bed(tmp_path) as b:
        r = Reconciler(account=ACCOUNT, store=b.store, publisher=b.broker, shards=SHARDS)

        async def in_one_round(messages: list[Outgoing]) -> list[Handled]:
            taken = await take_batches(b, messages)
            handled = await r.handle_round([batch for batch, _ in taken])
            for _, release in taken:
                release.set()
            await b.drained(*(Topology.changes_queue(ACCOUNT, s) for s in range(SHARDS)))
            return handled

        by_shard = {shard_of(f"person{i}@example.com", SHARDS): f"person{i}@example.com"
                    for i in range(40)}
        assert len(by_shard) == SHARDS > 1
        writes = [Topology.writes_queue(ACCOUNT, "dotdigital", s) for s in range(SHARDS)]
        # dotdigital's state of these keys is unknown and no complete read of the preference
        # was reconciled: their writes to dotdigital are deferred
        await in_one_round([m for email in by_shard.values()
                            for m in dynamics_change(True, version=1, email=email)])
        assert [c for q in writes for c in b.commands(q)] == []

        await in_one_round(read_markers(account=ACCOUNT, preference_id=PREFERENCE,
                                        started=NOW, shards=SHARDS, run_id=None,
                                        id_seed="read"))
        assert {c.email for q in writes for c in b.commands(q)} == set(by_shard.values())
        for shard in range(SHARDS):
            assert await b.store.get_checkpoint(
                ACCOUNT, f"reconciler:read:{PREFERENCE}:{shard}") is not None
        assert await b.store.deferred_emails(ACCOUNT, PREFERENCE) == []


async def test_a_malformed_message_is_dead_lettered_and_the_others_reconciled(
        tmp_path: Path) -> None:
    async with bed(tmp_path) as b:
        handle = (await reconciler(b)).handle
        bad = Outgoing(exchange=CHANGES_EXCHANGE, routing_key=Topology.changes_key(ACCOUNT, SHARD),
                       body=b'{"v": 1, "type": "preference-changes"}', message_id="bad")
        await b.broker.publish_many([*dynamics_change(True, version=1), bad,
                                     *dynamics_change(False, version=2)])
        b.consume(CHANGES, handle, service="reconciler")
        await b.drained(CHANGES)
        [dead] = b.dead_letters()
        assert dead.message_id == "bad"
        assert dead.headers["x-prefsync-kind"] == "malformed"
        assert dead.headers[REASON]
        history = await b.store.history(ACCOUNT, EMAIL)
        assert sorted(h.change_id for h in history) == ["dyn:row:1", "dyn:row:2"]
        # the last write wins: the opt-out goes to dotdigital
        assert [c.opted_in for c in b.commands(WRITES)][-1] is False


async def test_a_batch_failing_after_its_commit_is_redelivered_and_its_writes_sent_again(
        tmp_path: Path) -> None:
    async with bed(tmp_path) as b:
        # the broker goes away after the commit and stays away past the hold
        handler = Failing((await reconciler(b)).handle, after=True, times=100,
                          error=TransientFailure("the broker is down", dependency="broker"))
        await b.broker.publish_many(dynamics_change(True, version=1))
        b.consume(CHANGES, handler, service="reconciler")
        async with asyncio.timeout(10):
            while not any(d.redelivered for batch in handler.calls for d in batch):
                await b.broker.changed()
        handler.left = 0  # back
        await b.drained(CHANGES)
        assert handler.calls[0][0].delivery_count == 0
        redelivered = [d for batch in handler.calls for d in batch if d.redelivered]
        assert redelivered and redelivered[0].delivery_count == 1
        # folded again: a duplicate, not recorded twice
        history = await b.store.history(ACCOUNT, EMAIL)
        assert [h.decision for h in history] == ["applied"]
        # every attempt published the same write (same message id): one command for the writer
        sent = b.broker.take(WRITES)
        assert len({m.message_id for m in sent}) == 1
        assert b.dead_letters() == []


class CountingStore:
    """The bed's store, counting the directory reads asked of it apart from a batch's
    snapshot."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.apart: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if name in ("records_for_emails", "eligible_emails"):
            self.apart.append(name)
        return getattr(self._store, name)


def in_shard(name: str) -> str:
    """An email of ``name`` that falls in the shard the tests consume."""
    return next(email for n in range(1000)
                if shard_of(email := f"{name}{n}@example.com", SHARDS) == SHARD)


async def test_a_batch_reads_its_emails_records_once_in_its_snapshot(tmp_path: Path) -> None:
    async with bed(tmp_path) as b:
        eligible, ineligible, unknown = in_shard("ann"), in_shard("bob"), in_shard("cat")
        # ann and cat have eligible records; bob has none
        await b.store.upsert_records(ACCOUNT, [
            RecordRef(record_type="contact", record_id=f"rec-{email}", email=email)
            for email in (eligible, unknown)])
        await b.store.mark_eligible(ACCOUNT, [f"rec-{eligible}", f"rec-{unknown}"])
        counting = CountingStore(b.store)
        # dotdigital's feed was read in full after the records became eligible: a key of theirs
        # that dotdigital holds nothing for was never set there (covered)
        await b.store.set_checkpoint(ACCOUNT, f"reconciler:read:{PREFERENCE}:{SHARD}",
                                     (datetime.now(UTC) + timedelta(minutes=1)).isoformat())
        b.consume(CHANGES, Reconciler(account=ACCOUNT, store=counting, publisher=b.broker,
                                      shards=SHARDS).handle, service="reconciler")
        from_dotdigital = envelopes_by_shard(
            account=ACCOUNT, source="dotdigital", type="preference-changes", shards=SHARDS,
            changes=[PreferenceChange(email=email, preference_id=PREFERENCE, opted_in=True,
                                      origin_time=NOW, change_id=f"ec:{email}")
                     for email in (eligible, ineligible)],
            run_id=None, id_seed="ec")
        await b.broker.publish_many([*from_dotdigital,
                                     *dynamics_change(False, version=1, email=unknown)])
        await b.drained(CHANGES)
        # the eligible email's change is read in, the other's is not
        assert [h.decision for h in await b.store.history(ACCOUNT, eligible)] == ["applied"]
        assert [h.decision for h in await b.store.history(ACCOUNT, ineligible)] == [
            "ineligible"]
        # cat's write to dotdigital says a complete read covers it, as its record says
        commands = {c.email: c for c in b.commands(WRITES)}
        assert commands[unknown].covered and not commands[unknown].opted_in
        # every record came from the batch's snapshot
        assert counting.apart == []
        assert b.dead_letters() == []


async def test_an_opt_out_parked_and_resubscribed_in_one_batch_is_folded_in(
        tmp_path: Path) -> None:
    """The contact is suppressed; one batch holds a Dynamics opt-out (parked, as the contact
    is suppressed when it is read) and then dotdigital's news that the contact is subscribed
    again. The opt-out is folded in and written: the resubscription's clearing of the parked
    changes must not drop the one parked in its own batch."""
    async with bed(tmp_path) as b:
        await b.store.save_contacts([ContactState(account=ACCOUNT, email=EMAIL,
                                                  status="Suppressed", since=NOW)])
        await b.broker.publish_many([*dynamics_change(False, version=1),
                                     *status_change("Subscribed", at=NOW + timedelta(seconds=2))])
        b.consume(CHANGES, (await reconciler(b)).handle, service="reconciler")
        await b.drained(CHANGES)
        key = PreferenceKey(account=ACCOUNT, email=EMAIL, preference_id=PREFERENCE)
        state = (await b.store.load([key]))[key]
        assert state.register is not None and not state.register.opted_in
        assert [(c.email, c.opted_in) for c in b.commands(WRITES)] == [(EMAIL, False)]
        assert await b.store.parked_observations(ACCOUNT, [EMAIL]) == []
        history = await b.store.history(ACCOUNT, EMAIL)
        assert [h.decision for h in history] == ["suppressed", "applied"]


@pytest.mark.parametrize("crash", [False, True], ids=["", "failing-before-parking"])
async def test_a_change_parked_after_a_resubscription_in_its_batch_stays_parked(
        tmp_path: Path, crash: bool) -> None:
    """In one batch the contact is resubscribed, suppressed again, and a Dynamics opt-out is
    read: the opt-out is parked, and stays parked (clearing what the resubscription folded
    in must not clear it); also when the batch fails once between that clearing and the
    parking, and is redelivered."""
    async with bed(tmp_path) as b:
        await b.store.save_contacts([ContactState(account=ACCOUNT, email=EMAIL,
                                                  status="Suppressed", since=NOW)])
        await b.broker.publish_many([
            *status_change("Subscribed", at=NOW + timedelta(seconds=2)),
            *status_change("Suppressed", at=NOW + timedelta(seconds=3)),
            *dynamics_change(False, version=4)])
        store = (FailsOnce(b.store, method="park_observations",
                           error=TransientFailure("the ledger went away", dependency="store"))
                 if crash else b.store)
        handle = Reconciler(account=ACCOUNT, store=store, publisher=b.broker,
                            shards=SHARDS).handle
        await reconciler(b)  # (the read mark it sets)
        b.consume(CHANGES, handle, service="reconciler")
        if crash:
            async with asyncio.timeout(10):
                while not store.failed:
                    await b.broker.changed()
        await b.drained(CHANGES)
        [parked] = await b.store.parked_observations(ACCOUNT, [EMAIL])
        assert (parked.key.email, parked.opted_in, parked.change_id) == (EMAIL, False,
                                                                         "dyn:row:4")
        assert b.commands(WRITES) == []


def dotdigital_change(opted_in: bool, *, stamp: datetime) -> list[Outgoing]:
    """A change the ec-poller read, as it publishes it."""
    return envelopes_by_shard(
        account=ACCOUNT, source="dotdigital", type="preference-changes", shards=SHARDS,
        changes=[PreferenceChange(email=EMAIL, preference_id=PREFERENCE, opted_in=opted_in,
                                  origin_time=stamp,
                                  change_id=f"ec:1:{PREFERENCE}:{stamp.isoformat()}")],
        run_id=None, id_seed=f"feed:{stamp.isoformat()}")


@pytest.mark.parametrize("decided_before", [True, False])
async def test_an_opt_in_read_again_after_dotdigitals_clock_stepped_back_is_not_decided_again(
        tmp_path: Path, decided_before: bool) -> None:
    """dotdigital's clock ran 30 s ahead, then was put back at ``NOW``; a person's opt-in,
    stamped by it 5 s before (``NOW`` + 25 s on its face), lost to a newer opt-out in Dynamics,
    and our write of that opt-out is what dotdigital holds. The feed's overlap brings the
    opt-in back: a stamp both epochs of the clock could have made, placed as their hull,
    later than our write. Decided before, it is a duplicate; read for the first time, it is
    taken for what dotdigital holds, and the opt-out is written again."""
    key = PreferenceKey(account=ACCOUNT, email=EMAIL, preference_id=PREFERENCE)
    opt_in_stamp = NOW + timedelta(seconds=25)
    async with bed(tmp_path) as b:
        ahead = [OffsetSample(at=NOW - timedelta(seconds=40 - i), low_s=29.9, high_s=30.1)
                 for i in range(3)]
        put_back = [OffsetSample(at=NOW + timedelta(seconds=i / 2), low_s=-0.1, high_s=0.1)
                    for i in range(1, 4)]
        clock = await record_samples(b.store, account=ACCOUNT, side="dotdigital",
                                     samples=[*ahead, *put_back])
        assert clock.estimate is not None and clock.estimate.earlier  # it stepped
        opt_out = Observation(key=key, side="dynamics", opted_in=False,
                              origin_time=NOW + timedelta(seconds=1), version=5,
                              change_id="dyn:row:5")
        ours = Known(opted_in=False, as_of=NOW + timedelta(seconds=2))
        state = KeyState(key=key, register=Register.of(opt_out)).with_known(
            "dynamics", Known.of(opt_out)).with_known("dotdigital", ours)
        first_read = HistoryEntry(
            account=ACCOUNT, email=EMAIL, preference_id=PREFERENCE, side="dotdigital",
            opted_in=True, origin_time=opt_in_stamp,
            change_id=f"ec:1:{PREFERENCE}:{opt_in_stamp.isoformat()}",
            decision="tie_opt_in_lost", recorded_at=NOW - timedelta(seconds=4))
        await b.store.save([(None, state, None)], history=[first_read] if decided_before else [])
        await b.store.upsert_records(ACCOUNT, [
            RecordRef(record_type="contact", record_id="rec-ann", email=EMAIL)])
        await b.store.mark_eligible(ACCOUNT, ["rec-ann"])
        b.consume(CHANGES, (await reconciler(b)).handle, service="reconciler")
        await b.broker.publish_many(dotdigital_change(True, stamp=opt_in_stamp))
        await b.drained(CHANGES)
        after = (await b.store.load([key]))[key]
        commands = b.commands(WRITES)
        if decided_before:
            assert after.known.dotdigital == ours
            assert commands == []
            assert [h.decision for h in await b.store.history(ACCOUNT, EMAIL)] == [
                "tie_opt_in_lost"]
        else:
            assert after.known.dotdigital is not None and after.known.dotdigital.opted_in
            assert [(c.side, c.opted_in) for c in commands] == [("dotdigital", False)]
        assert after.register == state.register
        assert b.dead_letters() == []
