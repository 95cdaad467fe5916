"""A batch's reads from one snapshot (common.store.batch_reads): the same answers as each read
alone, on both ledgers and through the dry run's view; contact states and the directory's
subscription rows saved with key states in one transaction."""

from __future__ import annotations

from datetime import timedelta

import pytest

from common.domain import ContactState, KeyState
from common.domain.rows import EMPTY_STATE, key_tuple
from common.store import ConflictError, LedgerStore
from common.store.batch_reads import BatchReads, BatchSnapshot
from common.store.directory import RecordRef, SubscriptionRow
from common.vendors.clock_skew import CLOCK_CHECKPOINTS
from services.cli.dry_run.overlay import OverlayStore
from tests.harness.keys import T, key

from .test_store import full_state

pytestmark = pytest.mark.anyio

# more than one IN list's worth of values (the chunks are of 500)
MANY = 620


def contact(email: str, status: str, seconds: int = 0, account: str = "acme") -> ContactState:
    return ContactState(account=account, email=email, status=status,
                        since=T + timedelta(seconds=seconds))


async def seed(store: LedgerStore) -> BatchReads:
    """A ledger with some of everything a batch reads, in two accounts; the reads of ``acme``
    asking for stored and missing values alike."""
    emails = [f"p{i}@example.com" for i in range(MANY)]
    await store.save_contacts([contact(e, "Suppressed" if i % 7 == 0 else "Subscribed", i)
                               for i, e in enumerate(emails) if i % 2 == 0])
    await store.save_contacts([contact(emails[1], "Subscribed", account="globex")])
    await store.save([(None, full_state(key(email=e)), None) for e in emails[::3]])
    await store.save([(None, KeyState(key=key(email=emails[1], account="globex")), None)])
    await store.upsert_records("acme", [RecordRef(record_type="contact", record_id=f"r{i}",
                                                  email=e) for i, e in enumerate(emails)])
    await store.mark_eligible("acme", [f"r{i}" for i in range(0, MANY, 5)])
    # a second record (an inactive lead) for some emails, and another account's record
    await store.upsert_records("acme", [RecordRef(record_type="lead", record_id=f"l{i}",
                                                  email=e, active=False)
                                        for i, e in enumerate(emails) if i % 10 == 0])
    await store.mark_eligible("acme", [f"l{i}" for i in range(0, MANY, 10)])
    await store.upsert_records("globex", [RecordRef(record_type="contact", record_id="g1",
                                                    email=emails[1])])
    await store.mark_eligible("globex", ["g1"])
    await store.mark_resuming("acme", emails[::11])
    await store.mark_resuming("globex", emails[:5])
    await store.set_checkpoint("acme", CLOCK_CHECKPOINTS[0], "dynamics clock")
    await store.set_checkpoint("globex", CLOCK_CHECKPOINTS[1], "another account's")
    return BatchReads(account="acme", contacts_of=[*emails, "nobody@example.com"],
                      states_of=[key_tuple(key(email=e)) for e in emails],
                      eligible_of=emails, records_of=emails, resuming_of=emails,
                      checkpoints=[*CLOCK_CHECKPOINTS, "never-set"])


async def each_alone(store: LedgerStore | OverlayStore, reads: BatchReads) -> BatchSnapshot:
    account = reads.account
    return BatchSnapshot(
        contacts=await store.load_contacts(account, reads.contacts_of),
        states=await store.load_rows(reads.states_of),
        eligible=await store.eligible_emails(account, reads.eligible_of),
        records=await store.records_for_emails(account, reads.records_of),
        resuming=await store.resuming_contacts(account, reads.resuming_of),
        checkpoints={name: await store.get_checkpoint(account, name)
                     for name in reads.checkpoints})


async def test_a_batch_snapshot_answers_as_each_read_alone(store: LedgerStore) -> None:
    reads = await seed(store)
    got = await store.read_batch(reads)
    assert got == await each_alone(store, reads)
    # what the seed put there, so the comparison above is not of empty answers
    assert len(got.contacts) == MANY // 2 and len(got.states) == -(-MANY // 3)
    assert len(got.eligible) == MANY // 5 and len(got.resuming) == -(-MANY // 11)
    assert got.records.keys() == got.eligible
    assert [r.record_id for r in got.records["p0@example.com"]] == ["l0", "r0"]
    assert got.checkpoints == {CLOCK_CHECKPOINTS[0]: "dynamics clock",
                               CLOCK_CHECKPOINTS[1]: None, "never-set": None}


async def test_an_empty_batch_reads_nothing(store: LedgerStore) -> None:
    assert await store.read_batch(BatchReads(account="acme")) == BatchSnapshot()


async def test_the_dry_run_view_reads_a_batch_with_its_own_writes(store: LedgerStore) -> None:
    reads = await seed(store)
    view = OverlayStore(store)
    await view.save_contacts([contact("p1@example.com", "HardBounced", 1_000)])
    await view.save_rows([(None, key_tuple(key(email="p1@example.com")), EMPTY_STATE)])
    await view.mark_resuming("acme", ["p1@example.com"])
    await view.set_checkpoint("acme", CLOCK_CHECKPOINTS[1], "measured in the dry run")
    got = await view.read_batch(reads)
    assert got == await each_alone(view, reads)
    assert got.contacts["p1@example.com"].suppressed
    assert key_tuple(key(email="p1@example.com")) in got.states
    assert "p1@example.com" in got.resuming
    assert got.checkpoints[CLOCK_CHECKPOINTS[1]] == "measured in the dry run"
    # which contacts are suppressed, as the view has them
    assert await view.suppressed_among(
        "acme", ["p0@example.com", "p1@example.com", "p2@example.com"]) == {
        "p0@example.com", "p1@example.com"}  # the ledger's, and the view's own
    # the ledger itself is as it was
    assert "p1@example.com" not in await store.suppressed_among("acme", ["p1@example.com"])
    assert await store.read_batch(reads) == await each_alone(store, reads)
    assert "p1@example.com" not in (await store.read_batch(reads)).contacts


async def test_contacts_are_saved_with_the_key_states_or_not_at_all(store: LedgerStore) -> None:
    await store.save([(None, KeyState(key=key()), None)])
    ann = contact(key().email, "HardBounced", 10)
    with pytest.raises(ConflictError):
        await store.save_rows([(None, key_tuple(key()), EMPTY_STATE)], contacts=[ann])
    assert await store.load_contacts("acme", [key().email]) == {}

    await store.save_rows([(1, key_tuple(key()), EMPTY_STATE)], contacts=[ann])
    assert (await store.load_contacts("acme", [key().email]))[key().email].suppressed
    # as save_contacts: monotonic in the contact's own time
    await store.save_rows([], contacts=[contact(key().email, "Subscribed", 5)])
    assert (await store.load_contacts("acme", [key().email]))[key().email].suppressed
    await store.save_rows([], contacts=[contact(key().email, "Subscribed", 11)])
    assert not (await store.load_contacts("acme", [key().email]))[key().email].suppressed


def subscription(opted_in: bool, version: int, modified: str = "2026-01-01T00:00:00Z"
                 ) -> SubscriptionRow:
    return SubscriptionRow(subscription_id="s1", record_id="r1", preference_row_id="p1",
                           opted_in=opted_in, version=version, modified=modified)


async def test_subscription_rows_are_saved_with_the_key_states_or_not_at_all(
        store: LedgerStore) -> None:
    await store.save([(None, KeyState(key=key()), None)])
    opted_in = subscription(True, 7)
    with pytest.raises(ConflictError):
        await store.save_rows([(None, key_tuple(key()), EMPTY_STATE)],
                              subscriptions=[("acme", opted_in)])
    assert await store.subscriptions_for("acme", [("r1", "p1")]) == {}

    await store.save_rows([(1, key_tuple(key()), EMPTY_STATE)],
                          subscriptions=[("acme", opted_in)])
    assert await store.subscriptions_for("acme", [("r1", "p1")]) == {("r1", "p1"): opted_in}
    # as upsert_subscriptions: an older version never replaces a newer one
    await store.save_rows([], subscriptions=[("acme", subscription(False, 6))])
    assert await store.subscriptions_for("acme", [("r1", "p1")]) == {("r1", "p1"): opted_in}
    newer = subscription(False, 8)
    await store.save_rows([], subscriptions=[("acme", newer)])
    assert await store.subscriptions_for("acme", [("r1", "p1")]) == {("r1", "p1"): newer}
    # in its own account only
    assert await store.subscriptions_for("globex", [("r1", "p1")]) == {}
