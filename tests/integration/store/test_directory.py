"""The record directory, deferred writes and parked observations on both ledger backends."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from common.domain import Observation, PreferenceKey
from common.store import LedgerStore
from common.store.directory import RecordRef, SubscriptionRow

pytestmark = pytest.mark.anyio

# Dataverse row versions outgrow 32 bits.
BIG_VERSION = 9_000_000_001


async def test_records_and_eligibility(store: LedgerStore) -> None:
    await store.upsert_records("acme", [
        RecordRef(record_type="contact", record_id="c1", email="ann@example.com"),
        RecordRef(record_type="lead", record_id="l1", email="ann@example.com"),
        RecordRef(record_type="account", record_id="a1", email="bob@example.com", active=False),
    ])
    await store.upsert_records("globex", [
        RecordRef(record_type="contact", record_id="c1", email="eve@example.com")])
    assert await store.mark_eligible("acme", ["c1", "l1", "x9"]) == {"c1", "l1", "x9"}
    found = await store.records_for_emails("acme", ["ann@example.com", "bob@example.com"])
    assert [r.record_id for r in found["ann@example.com"]] == ["c1", "l1"]
    assert "bob@example.com" not in found                      # never eligible
    assert await store.eligible_emails("acme", ["ann@example.com", "eve@example.com"]) == {
        "ann@example.com"}
    assert await store.emails_of_records("acme", ["c1", "a1", "x9"]) == {
        "ann@example.com", "bob@example.com"}
    records = await store.records("acme", ["a1", "x9"])
    assert not records["a1"].active and records["x9"].email is None and records["x9"].eligible
    await store.forget_records("acme", ["l1"])
    assert set(await store.records("acme", ["c1", "l1"])) == {"c1"}
    assert (await store.records("globex", ["c1"]))["c1"].email == "eve@example.com"


async def test_a_record_remembers_when_its_email_last_changed(store: LedgerStore) -> None:
    def ref(email: str | None, modified: str) -> RecordRef:
        return RecordRef(record_type="contact", record_id="c1", email=email,
                         email_since=modified)

    await store.upsert_records("acme", [ref("ann@example.com", "2026-01-01T10:00:00Z")])
    assert (await store.records("acme", ["c1"]))["c1"].email_since is None  # first seen
    await store.upsert_records("acme", [ref("ann@example.com", "2026-01-02T10:00:00Z")])
    assert (await store.records("acme", ["c1"]))["c1"].email_since is None  # same email
    await store.upsert_records("acme", [ref("bea@example.com", "2026-01-03T10:00:00Z")])
    await store.mark_eligible("acme", ["c1"])
    (moved,) = (await store.records_for_emails("acme", ["bea@example.com"]))["bea@example.com"]
    assert moved.email_since == "2026-01-03T10:00:00Z"
    await store.upsert_records("acme", [ref("bea@example.com", "2026-01-04T10:00:00Z")])
    assert (await store.records("acme", ["c1"]))["c1"].email_since == "2026-01-03T10:00:00Z"


async def test_subscription_rows_keep_the_newest_version(store: LedgerStore) -> None:
    row = SubscriptionRow(subscription_id="s1", record_id="c1", preference_row_id="p1",
                          opted_in=True, version=BIG_VERSION)
    await store.upsert_subscriptions("acme", [row])
    await store.upsert_subscriptions("acme", [SubscriptionRow(
        subscription_id="s1", record_id="c1", preference_row_id="p1", opted_in=False,
        version=BIG_VERSION - 1)])
    found = await store.subscriptions_for("acme", [("c1", "p1"), ("c1", "p2")])
    assert found == {("c1", "p1"): row}
    await store.forget_subscriptions("acme", ["s1"])
    assert await store.subscriptions_for("acme", [("c1", "p1")]) == {}


async def test_deferred_writes(store: LedgerStore) -> None:
    await store.defer_writes("acme", [(1001, "ann@example.com"), (1001, "bob@example.com"),
                                      (1002, "ann@example.com"), (1001, "ann@example.com")])
    assert sorted(await store.deferred_emails("acme", 1001)) == ["ann@example.com",
                                                                 "bob@example.com"]
    await store.clear_deferred("acme", 1001, ["ann@example.com"])
    assert await store.deferred_emails("acme", 1001) == ["bob@example.com"]
    assert await store.deferred_emails("globex", 1002) == []


async def test_parked_observations_round_trip(store: LedgerStore) -> None:
    key = PreferenceKey(account="acme", email="ann@example.com", preference_id=1001)
    seen = Observation(key=key, side="dynamics", opted_in=True,
                       origin_time=datetime(2026, 3, 1, 9, 0, 0, 123456, tzinfo=UTC),
                       version=BIG_VERSION, change_id="dyn:1")
    await store.park_observations([seen])
    assert await store.parked_observations("acme", ["ann@example.com"]) == [seen]


async def test_newly_eligible_records_are_followed_up_until_cleared(store: LedgerStore) -> None:
    assert await store.mark_eligible("acme", ["c1", "c2"]) == {"c1", "c2"}
    await store.mark_eligible("globex", ["c1"])
    assert await store.mark_eligible("acme", ["c1", "c3"]) == {"c3"}
    assert await store.follow_ups("acme") == {"c1", "c2", "c3"}
    await store.clear_follow_ups("acme", ["c1", "c3"])
    assert await store.follow_ups("acme") == {"c2"}
    assert await store.follow_ups("globex") == {"c1"}
    # eligibility itself stays
    assert await store.eligible_ids("acme", ["c1", "c2", "c3"]) == {"c1", "c2", "c3"}


async def test_the_same_version_again_takes_only_what_differs(store: LedgerStore) -> None:
    # The same version again (the writer's write read back): what differs is still taken,
    # what is the same changes nothing.
    written = SubscriptionRow(subscription_id="s1", record_id="c1", preference_row_id="p1",
                              opted_in=True, version=7, modified=None)
    await store.upsert_subscriptions("acme", [written])
    read = SubscriptionRow(subscription_id="s1", record_id="c1", preference_row_id="p1",
                           opted_in=True, version=7, modified="2026-01-02T10:00:00Z")
    await store.upsert_subscriptions("acme", [read])
    assert await store.subscriptions_for("acme", [("c1", "p1")]) == {("c1", "p1"): read}
    await store.upsert_subscriptions("acme", [read])
    assert await store.subscriptions_for("acme", [("c1", "p1")]) == {("c1", "p1"): read}
    flipped = SubscriptionRow(subscription_id="s1", record_id="c1", preference_row_id="p1",
                              opted_in=False, version=7, modified="2026-01-02T10:00:00Z")
    await store.upsert_subscriptions("acme", [flipped])
    newer = SubscriptionRow(subscription_id="s1", record_id="c1", preference_row_id="p1",
                            opted_in=False, version=8, modified="2026-01-02T10:00:00Z")
    assert await store.subscriptions_for("acme", [("c1", "p1")]) == {("c1", "p1"): flipped}
    await store.upsert_subscriptions("acme", [newer])
    assert await store.subscriptions_for("acme", [("c1", "p1")]) == {("c1", "p1"): newer}


async def test_a_record_upserted_unchanged_keeps_its_entry(store: LedgerStore) -> None:
    def ref(**changes: Any) -> RecordRef:
        return replace(RecordRef(record_type="contact", record_id="c1", email="ann@example.com",
                                 active=True, email_since="2026-01-01T10:00:00Z"), **changes)

    assert await store.mark_eligible("acme", ["c1"]) == {"c1"}   # a placeholder first
    await store.upsert_records("acme", [ref()])
    await store.upsert_records("acme", [ref(email_since="2026-01-02T10:00:00Z")])
    (held,) = (await store.records("acme", ["c1"])).values()
    assert (held.email, held.active, held.eligible, held.email_since) == (
        "ann@example.com", True, True, None)
    await store.upsert_records("acme", [ref(active=False, email_since="2026-01-03T10:00:00Z")])
    assert not (await store.records("acme", ["c1"]))["c1"].active
    await store.upsert_records("acme", [ref(record_type="lead", active=False)])
    assert (await store.records("acme", ["c1"]))["c1"].record_type == "lead"
    await store.upsert_records("acme", [ref(email=None, record_type="lead", active=False)])
    assert (await store.records("acme", ["c1"]))["c1"].email is None
    await store.upsert_records("acme", [ref(email="bea@example.com", record_type="lead",
                                            active=False, email_since="2026-01-04T10:00:00Z")])
    moved = (await store.records("acme", ["c1"]))["c1"]
    # NULL -> an email is not a change of email: no email_since (as before)
    assert (moved.email, moved.email_since) == ("bea@example.com", None)
    await store.upsert_records("acme", [ref(email="cat@example.com", record_type="lead",
                                            active=False, email_since="2026-01-05T10:00:00Z")])
    moved = (await store.records("acme", ["c1"]))["c1"]
    assert (moved.email, moved.email_since) == ("cat@example.com", "2026-01-05T10:00:00Z")
