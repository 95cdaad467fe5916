"""The index of keys with outstanding writes, SQLite and PostgreSQL alike: kept by every save,
asked by age, suppressed contacts left out, settled rows dropped only at their revision, and
built once for a ledger made before it existed."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from common.domain import ContactState, KeyState, Known, PerSide, PreferenceKey, Register
from common.store import LedgerStore, open_store
from common.store.directory import RecordRef
from tests.harness.keys import T, key

pytestmark = pytest.mark.anyio

LATER = timedelta(hours=1)


def state(k: PreferenceKey, *, opted_in: bool = False, at: int = 0,
          written: tuple[str, ...] = ()) -> KeyState:
    """A register set from Dynamics; ``written``: the sides known to hold it."""
    origin = T + timedelta(seconds=at)
    held = Known(opted_in=opted_in, as_of=origin)
    return KeyState(key=k, register=Register(opted_in=opted_in, origin_time=origin,
                                             origin_side="dynamics", change_id=f"c{at}"),
                    known=PerSide(dynamics=held if "dynamics" in written else None,
                                  dotdigital=held if "dotdigital" in written else None))


def soon() -> datetime:
    return datetime.now(UTC) + timedelta(seconds=1)


async def due_keys(store: LedgerStore, account: str = "acme", *, now: datetime | None = None,
                   limit: int = 100) -> list[PreferenceKey]:
    at = now or soon()
    return [d.key for d in await store.outstanding_due(account, since_before=at, now=at,
                                                       limit=limit)]


async def test_every_save_keeps_the_index(store: LedgerStore) -> None:
    ann, bob = key(), key("bob@example.com")
    before = datetime.now(UTC) - timedelta(seconds=1)
    await store.save([(None, state(ann, written=("dynamics",)), None),
                      (None, state(bob, written=("dynamics", "dotdigital")), None)])
    stats = await store.outstanding_stats("acme", since_before=soon())
    assert stats.keys == 1 and stats.oldest is not None and stats.oldest > before
    # younger than the grace period: not counted, not due
    assert (await store.outstanding_stats("acme", since_before=before)).keys == 0
    assert await store.outstanding_due("acme", since_before=before, now=soon(), limit=10) == []
    [due] = await store.outstanding_due("acme", since_before=soon(), now=soon(), limit=10)
    assert (due.key, due.revision, due.sweeps) == (ann, 1, 0)
    # the write landed: the key is no longer outstanding
    await store.save([(1, state(ann, written=("dynamics", "dotdigital")), None)])
    assert (await store.outstanding_stats("acme", since_before=soon())).keys == 0
    assert await due_keys(store) == []


async def test_a_new_register_value_starts_again_and_the_same_one_keeps_its_age(
        store: LedgerStore) -> None:
    ann = key()
    await store.save([(None, state(ann), None)])
    first = (await store.outstanding_stats("acme", since_before=soon())).oldest
    await store.postpone_outstanding([(ann, datetime.now(UTC) + LATER)])
    assert await due_keys(store) == []
    # a later clock reading for the next save: a save reads the wall clock (the store takes
    # no clock to step), so time must pass; there is nothing to await
    await asyncio.sleep(0.01)
    # one side written, the other still outstanding: same age, still postponed
    await store.save([(1, state(ann, written=("dynamics",)), None)])
    assert (await store.outstanding_stats("acme", since_before=soon())).oldest == first
    assert await due_keys(store) == []
    assert await due_keys(store, now=datetime.now(UTC) + 2 * LATER) == [ann]
    # a new value: outstanding from now, due again, not swept yet
    await store.save([(2, state(ann, opted_in=True, at=60), None)])
    stats = await store.outstanding_stats("acme", since_before=soon())
    assert first is not None and stats.oldest is not None and stats.oldest > first
    [due] = await store.outstanding_due("acme", since_before=soon(), now=soon(), limit=10)
    assert (due.key, due.revision, due.sweeps) == (ann, 3, 0)


async def test_postponed_keys_wait_and_the_longest_due_comes_first(store: LedgerStore) -> None:
    keys = [key(f"p{i}@example.com") for i in range(4)]
    await store.save([(None, state(k), None) for k in keys])
    now = datetime.now(UTC)
    await store.postpone_outstanding([(keys[0], now + LATER), (keys[1], now - LATER)])
    assert await due_keys(store, limit=2) == [keys[1], keys[2]]
    assert await due_keys(store) == [keys[1], keys[2], keys[3]]
    [swept] = [d for d in await store.outstanding_due("acme", since_before=soon(),
                                                         now=soon(), limit=10)
               if d.key == keys[1]]
    assert swept.sweeps == 1
    assert await due_keys(store, now=now + 2 * LATER) == [keys[1], keys[2], keys[3], keys[0]]


async def test_suppressed_contacts_and_other_accounts_are_left_out(store: LedgerStore) -> None:
    ann, bob, other = key(), key("bob@example.com"), key(account="other")
    await store.save([(None, state(k), None) for k in (ann, bob, other)])
    await store.save_contacts([ContactState(account="acme", email="ann@example.com",
                                            status="Unsubscribed", since=T)])
    assert (await store.outstanding_stats("acme", since_before=soon())).keys == 1
    assert await due_keys(store) == [bob]
    await store.save_contacts([ContactState(account="acme", email="ann@example.com",
                                            status="Subscribed", since=T + LATER)])
    assert await due_keys(store) == [ann, bob]
    assert await due_keys(store, "other") == [other]


async def test_keys_owed_only_to_dynamics_records_that_cannot_take_them_are_left_out(
        store: LedgerStore) -> None:
    # ann's write is owed to Dynamics only, and her one record is inactive: nothing can take it
    # (the writer records 'read-only'); bob is owed dotdigital too
    ann, bob = key(), key("bob@example.com")
    await store.save([(None, state(ann, written=("dotdigital",)), None),
                      (None, state(bob), None)])
    await store.upsert_records("acme", [
        RecordRef(record_type="contact", record_id="c-ann", email="ann@example.com",
                  active=False),
        RecordRef(record_type="contact", record_id="c-bob", email="bob@example.com",
                  active=False)])
    await store.mark_eligible("acme", ["c-ann", "c-bob"])
    assert await due_keys(store) == [bob]
    assert (await store.outstanding_stats("acme", since_before=soon())).keys == 1
    # the record is active again: the write is owed (and swept) again
    await store.upsert_records("acme", [RecordRef(record_type="contact", record_id="c-ann",
                                                  email="ann@example.com", active=True)])
    assert await due_keys(store) == [ann, bob]


async def test_a_settled_row_is_dropped_only_if_no_later_save_wrote_it(store: LedgerStore) -> None:
    ann = key()
    await store.save([(None, state(ann), None)])
    await store.save([(1, state(ann, opted_in=True, at=5), None)])  # revision 2, outstanding
    await store.drop_outstanding([(ann, 1)])  # what a sweep that loaded revision 1 saw
    assert await due_keys(store) == [ann]
    await store.drop_outstanding([(ann, 2)])
    assert await due_keys(store) == []


async def test_a_ledger_made_before_the_index_builds_it_once(url: str) -> None:
    outstanding = [key(f"o{i}@example.com") for i in range(5)]
    settled = [key(f"s{i}@example.com") for i in range(3)]
    async with open_store(url) as store:
        await store.save([(None, state(k), None) for k in outstanding]
                         + [(None, state(k, written=("dynamics", "dotdigital")), None)
                            for k in settled]
                         + [(None, state(key(account="other")), None)])
        # as the ledger was before the index existed
        async with store._transaction() as db:  # type: ignore[attr-defined]
            await db.execute("DELETE FROM outstanding_keys")
            await db.execute("DELETE FROM meta WHERE name = 'outstanding-index'")
    async with open_store(url) as store:
        assert (await store.outstanding_stats("acme", since_before=soon())).keys == 0
        pages = 1
        while not await store.index_outstanding("acme", limit=3):
            pages += 1
        assert pages == 3  # 8 states, 3 a page
        assert await due_keys(store) == outstanding
        assert await due_keys(store, "other") == []
        assert await store.index_outstanding("other", limit=3)
        assert await due_keys(store, "other") == [key(account="other")]
        assert await store.index_outstanding("acme", limit=3)  # done once and for all
    async with open_store(url) as store:  # opened again: nothing more to build
        assert await store.index_outstanding("acme", limit=3)
        assert await due_keys(store) == outstanding


async def test_a_new_ledger_has_nothing_to_build(store: LedgerStore) -> None:
    await store.save([(None, state(key()), None)])
    assert await store.index_outstanding("acme", limit=10)
    assert await due_keys(store) == [key()]
