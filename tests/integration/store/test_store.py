"""The ledger store, SQLite and PostgreSQL alike: compare-and-set, atomicity, round trips,
isolation, persistence."""

from __future__ import annotations

import asyncio
import sqlite3
import zlib
from collections.abc import Coroutine
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from common.domain import (
    ContactState,
    HistoryEntry,
    KeyState,
    Known,
    LedgerHorizon,
    Observation,
    PendingWrite,
    PerSide,
    PreferenceKey,
    Register,
    Side,
    WriteRecord,
)
from common.domain.clock import UNKNOWN_EPOCH
from common.domain.reconcile import FOLDED
from common.domain.rows import (
    DECISIONS,
    EMPTY_STATE,
    KeyTuple,
    ObservationRow,
    key_tuple,
    observation_row,
    state_row,
)
from common.store import ConflictError, LedgerStore, SqliteLedgerStore, open_store
from common.store.codec import to_us
from common.store.history import BUCKETS, history_bucket
from common.store.interface import StoreUnavailable
from common.store.postgres import DDL_STAMP, PostgresLedgerStore
from common.store.sqlite import WAL_CHECKPOINT_PAGES
from services.cli.dry_run.overlay import OverlayStore
from services.runtime.registry import ledger_cache_mib
from tests.harness.keys import T, key
from tests.harness.waiting import until
from tests.integration.store.test_write_batches import batch
from tests.unit.store.test_codec import FORMAT_1_SHORT

from .backends import postgres_schema

pytestmark = pytest.mark.anyio


def full_state(k: PreferenceKey) -> KeyState:
    """A state with every field set (and the optional ones both set and unset)."""
    return KeyState(
        key=k,
        register=Register(opted_in=False, origin_time=T + timedelta(microseconds=123456),
                          origin_side="dotdigital", change_id="dd:ünïcode-1"),
        known=PerSide(dynamics=Known(opted_in=True, as_of=T, version=9_000_000_001),
                      dotdigital=Known(opted_in=False, as_of=T + timedelta(milliseconds=5))),
        pending=PerSide(dynamics=PendingWrite(opted_in=False, origin_time=T), dotdigital=None),
        writes=PerSide(
            dynamics=(WriteRecord(side="dynamics", opted_in=False, register_origin_time=T,
                                  window_start=T, window_end=T + timedelta(seconds=1),
                                  produced_version=9_000_000_002,
                                  written_at=T + timedelta(seconds=1)),),
            dotdigital=(WriteRecord(side="dotdigital", opted_in=True, register_origin_time=T,
                                    window_start=T + timedelta(seconds=2)),),
        ),
        horizon=PerSide(dynamics=LedgerHorizon(until=T, version=7), dotdigital=None),
    )


def entry(k: PreferenceKey, decision: str, recorded: datetime) -> HistoryEntry:
    return HistoryEntry(account=k.account, email=k.email, preference_id=k.preference_id,
                        side="dynamics", opted_in=True, origin_time=T, change_id=decision,
                        decision=decision, recorded_at=recorded)


def test_open_store_urls(tmp_path: Path) -> None:
    assert repr(open_store("sqlite:///data/ledger.db")) == "SqliteLedgerStore(path='data/ledger.db')"
    assert repr(open_store("sqlite:////var/lib/x.db")) == "SqliteLedgerStore(path='/var/lib/x.db')"
    assert isinstance(open_store("sqlite:///:memory:"), SqliteLedgerStore)
    for url in ("postgresql://user:hunter2@db/ledger", "postgres://user:hunter2@db:5433/x"):
        store = open_store(url)
        assert isinstance(store, PostgresLedgerStore)
        assert "hunter2" not in repr(store) and "***" in repr(store)


async def test_an_unreachable_postgresql_is_named_without_credentials() -> None:
    with pytest.raises(StoreUnavailable) as info:
        await open_store("postgresql://user:hunter2@127.0.0.1:1/ledger").open()
    assert "127.0.0.1" in str(info.value)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("url", ["redis://:hunter2@x/0", "mysql://u:hunter2@db/x"])
def test_unknown_scheme_names_the_scheme_but_never_the_credentials(url: str) -> None:
    with pytest.raises(ValueError) as info:
        open_store(url)
    assert url.partition(":")[0] in str(info.value)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("url", ["hunter2", "sqlite://host/x.db", "sqlite:///", "sqlite:///a?x=1"])
def test_malformed_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError) as info:
        open_store(url)
    assert "hunter2" not in str(info.value)


async def test_using_a_closed_store_is_an_error(url: str) -> None:
    with pytest.raises(RuntimeError):
        await open_store(url).get_checkpoint("acme", "x")


async def test_a_ledger_of_another_schema_version_is_refused(url: str) -> None:
    async with open_store(url) as store:
        assert isinstance(store, SqliteLedgerStore)  # either backend (PostgreSQL's extends it)
        async with store._transaction() as db:
            await db.execute("UPDATE meta SET value = ? WHERE name = 'schema'", ("99",))
    with pytest.raises(RuntimeError, match="ledger schema 99 is not the supported 4"):
        await open_store(url).open()


async def test_every_field_round_trips(store: LedgerStore) -> None:
    state = full_state(key())
    assert await store.save([(None, state, None)]) == [1]
    loaded = await store.load([key(), key(pref=2)])
    assert loaded == {key(): replace(state, revision=1)}


async def test_rows_are_the_states_as_rows_both_ways(store: LedgerStore) -> None:
    state = full_state(key())
    await store.save([(None, state, None)])
    rows = await store.load_rows([key_tuple(key()), key_tuple(key(pref=2))])
    assert rows == {key_tuple(key()): state_row(replace(state, revision=1))}

    changed = replace(state, register=None)
    assert await store.save_rows([(1, key_tuple(key()), state_row(changed)),
                                  (None, key_tuple(key(pref=2)), EMPTY_STATE)]) == [2, 1]
    assert await store.load([key(), key(pref=2)]) == {
        key(): replace(changed, revision=2), key(pref=2): KeyState(key=key(pref=2), revision=1)}


async def test_rows_are_saved_with_compare_and_set_and_their_history(store: LedgerStore) -> None:
    await store.save([(None, KeyState(key=key()), None)])
    decided = (key_tuple(key()), 1, True, to_us(T), "dd:1", DECISIONS.index("applied"),
               to_us(T) - 250_000)
    with pytest.raises(ConflictError) as info:
        await store.save_rows([(None, key_tuple(key()), EMPTY_STATE)], history=[decided],
                              recorded_at=T, entries=[entry(key(), "written", T)])
    assert info.value.keys == (key(),)
    assert await store.history(key().account, key().email) == []

    await store.save_rows([(1, key_tuple(key()), EMPTY_STATE)], history=[decided],
                          recorded_at=T + timedelta(seconds=1),
                          entries=[entry(key(), "written", T + timedelta(seconds=2))])
    assert await store.history(key().account, key().email) == [
        HistoryEntry(account=key().account, email=key().email, preference_id=key().preference_id,
                     side="dotdigital", opted_in=True, origin_time=T, change_id="dd:1",
                     decision="applied", recorded_at=T + timedelta(seconds=1),
                     corrected_time=T - timedelta(milliseconds=250)),
        entry(key(), "written", T + timedelta(seconds=2))]


@pytest.mark.parametrize("schema", ["1", "3"])
async def test_an_older_ledger_is_brought_to_4_and_its_states_still_read(
        url: str, schema: str) -> None:
    async with open_store(url) as store:
        assert isinstance(store, SqliteLedgerStore)
        async with store._transaction() as db:
            await db.execute("UPDATE meta SET value = ? WHERE name = 'schema'", (schema,))
            await db.execute("INSERT INTO key_state (account, email, preference_id, revision, "
                             "state) VALUES (?, ?, ?, 3, ?)",
                             (key().account, key().email, key().preference_id, FORMAT_1_SHORT))
    async with open_store(url) as store:
        assert isinstance(store, SqliteLedgerStore)
        async with store._transaction() as db, \
                db.execute("SELECT value FROM meta WHERE name = 'schema'") as cursor:
            assert await cursor.fetchall() in ([("4",)], [["4"]])
        state = (await store.load([key()]))[key()]
        assert state.register is not None and state.register.change_id == "dyn:2"
        assert state.revision == 3
        await store.save([(3, state, None)])
        async with store._transaction() as db, \
                db.execute("SELECT state FROM key_state") as cursor:
            (blob,), = await cursor.fetchall()
        assert bytes(blob).startswith(b"[2,")


async def test_a_schema_2_ledgers_history_is_given_buckets_and_found_by_email(url: str) -> None:
    ann, bob = key(), key("bob@example.com")
    async with open_store(url) as store:
        assert isinstance(store, SqliteLedgerStore)
        await store.save([(None, KeyState(key=ann), entry(ann, "applied", T)),
                          (None, KeyState(key=bob), entry(bob, "applied", T))],
                         history=[entry(ann, "written", T + timedelta(seconds=1))])
        # as the previous release left it: no buckets, found through an index by email
        async with store._transaction() as db:
            await db.execute("UPDATE meta SET value = '2' WHERE name = 'schema'")
            await db.execute("UPDATE history SET bucket = NULL")
    async with open_store(url) as store:
        assert isinstance(store, SqliteLedgerStore)
        async with store._transaction() as db, \
                db.execute("SELECT COUNT(*) FROM history WHERE bucket IS NULL") as cursor:
            assert list(await cursor.fetchone()) == [0]
        assert [h.decision for h in await store.history("acme", ann.email)] == ["applied",
                                                                                 "written"]
        assert [h.decision for h in await store.history("acme", bob.email)] == ["applied"]
        assert (await store.personal_data("acme", ann.email))["history"] == 2
        assert (await store.forget_email("acme", ann.email))["history"] == 2
        assert await store.history("acme", ann.email) == []
        assert len(await store.history("acme", bob.email)) == 1


async def test_history_rows_are_indexed_by_bucket_not_by_email(url: str) -> None:
    async with open_store(url) as store:
        assert isinstance(store, SqliteLedgerStore)
        await store.save([(None, KeyState(key=key()), entry(key(), "applied", T))])
        async with store._transaction() as db, \
                db.execute("SELECT bucket FROM history") as cursor:
            assert [row[0] for row in await cursor.fetchall()] == [history_bucket(key().email)]
    assert 0 <= history_bucket("ann@example.com") < BUCKETS
    # the same in every process and release: a CRC-32 of the email
    assert history_bucket("ann@example.com") == zlib.crc32(b"ann@example.com") % BUCKETS


async def test_compare_and_set(store: LedgerStore) -> None:
    state = KeyState(key=key())
    assert await store.save([(None, state, None)]) == [1]
    with pytest.raises(ConflictError) as info:
        await store.save([(0, state, None)])                    # it exists now
    assert info.value.keys == (key(),)
    assert await store.save([(1, full_state(key()), None)]) == [2]
    with pytest.raises(ConflictError):
        await store.save([(1, state, None)])                    # someone else moved it
    assert (await store.load([key()]))[key()] == replace(full_state(key()), revision=2)


async def test_a_conflict_writes_nothing(store: LedgerStore) -> None:
    await store.save([(None, KeyState(key=key("bob@example.com")), None)])
    fresh = KeyState(key=key())
    late = KeyState(key=key("bob@example.com"))
    with pytest.raises(ConflictError) as info:
        await store.save([(None, fresh, entry(key(), "applied", T)),
                          (7, late, entry(late.key, "applied", T))],
                         history=[entry(key(), "extra", T)])
    assert info.value.keys == (late.key,)
    assert await store.load([key()]) == {}
    assert await store.history("acme", "ann@example.com") == []
    assert await store.history("acme", "bob@example.com") == []


async def test_a_key_expected_stored_but_erased_meanwhile_is_a_conflict(
        store: LedgerStore) -> None:
    # loaded at revision 1, then its email erased before the save: nothing may bring it back
    stored = KeyState(key=key())
    await store.save([(None, stored, None), (None, KeyState(key=key(pref=2)), None)])
    await store.forget_email("acme", "ann@example.com")
    with pytest.raises(ConflictError) as info:
        await store.save([(1, full_state(key()), None), (None, KeyState(key=key(pref=3)), None)])
    assert info.value.keys == (key(),)
    assert await store.load([key(), key(pref=2), key(pref=3)]) == {}


async def test_a_key_only_once_per_save(store: LedgerStore) -> None:
    with pytest.raises(ValueError):
        await store.save([(None, KeyState(key=key()), None), (None, KeyState(key=key()), None)])


async def test_history_is_ordered_by_recorded_time(store: LedgerStore) -> None:
    k = key()
    await store.save([(None, KeyState(key=k), entry(k, "third", T + timedelta(seconds=3)))],
                     history=[entry(k, "first", T + timedelta(seconds=1)),
                              entry(k, "second-a", T + timedelta(seconds=2))])
    await store.save([], history=[entry(k, "second-b", T + timedelta(seconds=2)),
                                  entry(key("bob@example.com"), "not-ann", T)])
    got = await store.history("acme", " ANN@example.com ")
    assert [h.decision for h in got] == ["first", "second-a", "second-b", "third"]
    assert got[0] == entry(k, "first", T + timedelta(seconds=1))


async def test_states_for_email_and_account_isolation(store: LedgerStore) -> None:
    mine = [KeyState(key=key(pref=p)) for p in (3, 1, 2)]
    theirs = KeyState(key=key(account="globex"))
    other = KeyState(key=key("bob@example.com"))
    await store.save([(None, s, None) for s in [*mine, theirs, other]])
    got = await store.states_for_email("acme", "Ann@Example.com")
    assert [s.key.preference_id for s in got] == [1, 2, 3]
    assert [s.key.account for s in await store.states_for_email("globex", "ann@example.com")] == [
        "globex"]
    assert await store.history("globex", "ann@example.com") == []


async def test_checkpoints(store: LedgerStore) -> None:
    source = "dotdigital:optins:1001"
    assert await store.get_checkpoint("acme", source) is None
    await store.set_checkpoint("acme", source, "2026-03-01T09:00:00.000Z")
    await store.set_checkpoint("acme", source, "2026-03-01T10:00:00.000Z")
    await store.set_checkpoint("globex", source, "other")
    assert await store.get_checkpoint("acme", source) == "2026-03-01T10:00:00.000Z"
    assert await store.get_checkpoint("globex", source) == "other"
    assert await store.get_checkpoint("acme", "dynamics:psync_marketingpreferencesubscriptions") is None


async def test_eligibility_is_sticky_and_per_account(store: LedgerStore) -> None:
    await store.mark_eligible("acme", ["c1", "c2", "c2"])
    await store.mark_eligible("acme", ["c1"])
    await store.mark_eligible("globex", ["c3"])
    assert await store.eligible_ids("acme", ["c1", "c2", "c3", "c4"]) == {"c1", "c2"}
    assert await store.eligible_ids("globex", ["c1", "c3"]) == {"c3"}
    many = [f"r{i}" for i in range(1000)]
    await store.mark_eligible("acme", many)
    assert await store.eligible_ids("acme", [*many, "nope"]) == set(many)


async def test_contact_states_are_monotonic(store: LedgerStore) -> None:
    def contact(status: str, seconds: int) -> ContactState:
        return ContactState(account="acme", email="Ann@Example.com", status=status,
                            since=T + timedelta(seconds=seconds))

    await store.save_contacts([contact("Subscribed", 0)])
    await store.save_contacts([contact("HardBounced", 10)])
    await store.save_contacts([contact("Subscribed", 5)])        # older: ignored
    got = await store.load_contacts("acme", ["ann@example.com", "nobody@example.com"])
    assert list(got) == ["ann@example.com"]
    assert got["ann@example.com"].status == "HardBounced"
    assert got["ann@example.com"].suppressed
    await store.save_contacts([contact("Subscribed", 10)])       # same time: suppression holds
    assert (await store.load_contacts("acme", ["ann@example.com"]))["ann@example.com"].suppressed
    await store.save_contacts([contact("Subscribed", 11)])
    assert not (await store.load_contacts("acme", ["ann@example.com"]))[
        "ann@example.com"].suppressed
    assert await store.load_contacts("globex", ["ann@example.com"]) == {}


async def test_suppressed_among_names_only_the_suppressed_contacts_asked_for(
        store: LedgerStore) -> None:
    def contact(account: str, email: str, status: str) -> ContactState:
        return ContactState(account=account, email=email, status=status, since=T)

    many = [f"p{i}@example.com" for i in range(700)]  # more than one query's worth
    await store.save_contacts([
        *(contact("acme", e, "Unsubscribed" if i % 100 == 7 else "Subscribed")
          for i, e in enumerate(many)),
        contact("acme", "ann@example.com", "HardBounced"),
        contact("globex", "bob@example.com", "Unsubscribed")])
    assert await store.suppressed_among("acme", [*many, "ann@example.com", "nobody@example.com",
                                                 "bob@example.com"]) == {
        *(e for i, e in enumerate(many) if i % 100 == 7), "ann@example.com"}
    assert await store.suppressed_among("acme", []) == set()
    assert await store.suppressed_among("globex", ["ann@example.com", "bob@example.com"]) == {
        "bob@example.com"}


async def test_reopening_keeps_everything(url: str) -> None:
    state = full_state(key())
    async with open_store(url) as s:
        await s.save([(None, state, entry(key(), "applied", T))])
        await s.set_checkpoint("acme", "dynamics:x", "token-1")
        await s.mark_eligible("acme", ["c1"])
        await s.save_contacts([ContactState(account="acme", email="ann@example.com",
                                            status="Suppressed", since=T)])
    async with open_store(url) as s:
        assert (await s.load([key()]))[key()] == replace(state, revision=1)
        assert [h.decision for h in await s.history("acme", "ann@example.com")] == ["applied"]
        assert await s.get_checkpoint("acme", "dynamics:x") == "token-1"
        assert await s.eligible_ids("acme", ["c1"]) == {"c1"}
        assert (await s.load_contacts("acme", ["ann@example.com"]))["ann@example.com"].suppressed


async def test_many_keys_in_one_save(store: LedgerStore) -> None:
    states = [KeyState(key=key(f"p{i}@example.com")) for i in range(1200)]
    assert set(await store.save([(None, s, None) for s in states])) == {1}
    loaded = await store.load(s.key for s in states)
    assert len(loaded) == 1200
    with pytest.raises(ConflictError) as info:
        await store.save([(1, s, None) for s in states[:5]] + [(None, states[1000], None)])
    assert info.value.keys == (states[1000].key,)


async def test_services_opening_a_new_sqlite_ledger_at_once_all_open_it(tmp_path: Path) -> None:
    # compose and the benchmark start every service together on one fresh file; the first to
    # open it switches it to WAL while the others open it too.
    async def opens(url: str) -> None:
        async with open_store(url):
            pass

    for attempt in range(20):
        url = f"sqlite:///{tmp_path / f'ledger-{attempt}.db'}"
        await asyncio.gather(*(opens(url) for _ in range(8)))


async def test_a_sqlite_ledger_copies_its_wal_back_only_past_its_own_interval(
        tmp_path: Path) -> None:
    # A save dirties about a page per key: at SQLite's default interval (1,000 pages) nearly
    # every big save would be followed by a checkpoint (bench.wal_cost).
    async with open_store(f"sqlite:///{tmp_path / 'ledger.db'}") as store:
        assert isinstance(store, SqliteLedgerStore)
        assert store._db is not None
        async with store._db.execute("PRAGMA wal_autocheckpoint") as cursor:
            assert await cursor.fetchall() == [(WAL_CHECKPOINT_PAGES,)]
    assert WAL_CHECKPOINT_PAGES > 1_000  # past SQLite's own


async def cancelled_while_locked(store: SqliteLedgerStore, path: Path,
                                 call: Coroutine[Any, Any, None]) -> None:
    """``call`` on ``store``, cancelled while another process holds the ledger's write lock
    (once the call has taken the store's connection and sent its BEGIN: a lock has no event to
    await); the lock is released after."""
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another process's write lock
        waiting = asyncio.create_task(call)
        await until(lambda: store._lock.locked(), timeout_s=10, every=0.005,
                    what="the call waits for the lock")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    finally:
        holder.execute("ROLLBACK")
        holder.close()


async def test_a_sqlite_call_cancelled_while_it_waits_for_the_lock_leaves_the_ledger_usable(
        tmp_path: Path) -> None:
    # A lease cancel, the readiness probe's timeout or a shutdown cancels a call while another
    # process holds the write lock: neither this store nor another process may be jammed.
    path = tmp_path / "ledger.db"
    async with open_store(f"sqlite:///{path}") as store:
        assert isinstance(store, SqliteLedgerStore)
        await store.set_checkpoint("acme", "feed", "0")
        await cancelled_while_locked(store, path, store.set_checkpoint("acme", "feed", "1"))
        async with asyncio.timeout(30):
            await store.set_checkpoint("acme", "feed", "2")
            assert await store.get_checkpoint("acme", "feed") == "2"
            async with open_store(f"sqlite:///{path}") as other:
                await other.set_checkpoint("acme", "other", "3")
            await store.set_checkpoint("acme", "feed", "4")
        assert await store.get_checkpoint("acme", "feed") == "4"
        assert await store.get_checkpoint("acme", "other") == "3"


async def test_a_short_write_cancelled_while_it_waits_for_the_lock_commits_only_if_harmless(
        tmp_path: Path) -> None:
    # A checkpoint set is one job in the connection's thread: cancelled once it started, it
    # still commits when the lock frees (a checkpoint of work done stands as if set just
    # before). A write batch begun keeps its own transaction: cancelled, it leaves no record of
    # writes its round will never send.
    path = tmp_path / "ledger.db"
    async with open_store(f"sqlite:///{path}") as store:
        assert isinstance(store, SqliteLedgerStore)
        await store.set_checkpoint("acme", "feed", "0")
        await cancelled_while_locked(
            store, path, store.begin_writes(batch("b1", key(email="ann@example.com"))))
        await until(lambda: not store._lock.locked(), timeout_s=30, every=0.005,
                    what="the cancelled call's end")
        await cancelled_while_locked(store, path, store.set_checkpoint("acme", "feed", "1"))
        assert await store.get_checkpoint("acme", "feed") == "1"
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM write_batches").fetchone() == (0,)


async def test_a_sqlite_ledger_locked_past_the_busy_timeout_is_unavailable_for_now(
        tmp_path: Path) -> None:
    # another process holds the write lock (a long transaction): opening is a transient failure
    # (a service waits and tries again), never a configuration error
    path = tmp_path / "ledger.db"
    async with SqliteLedgerStore(path=str(path)):
        pass
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable) as info:
            await SqliteLedgerStore(path=str(path), busy_timeout_s=0.2).open()
        assert info.value.transient and "locked" in str(info.value)
    finally:
        holder.close()
    async with SqliteLedgerStore(path=str(path), busy_timeout_s=0.2):
        pass


async def test_a_sqlite_ledger_keeps_the_page_cache_its_service_asks_for(tmp_path: Path) -> None:
    # the dynamics-poller's connection gets a bigger page cache; the others keep SQLite's
    async def cache_kib(store: LedgerStore) -> int:
        held = await store.get_checkpoint("none", "none")  # opened and used
        assert held is None and isinstance(store, SqliteLedgerStore)
        db = store._db
        assert db is not None
        return -int(await db.run(lambda c: c.execute("PRAGMA cache_size").fetchone()[0]))

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    async with open_store(url, cache_mib=ledger_cache_mib(("dynamics-poller",))) as poller, \
            open_store(url, cache_mib=ledger_cache_mib(("reconciler",))) as reconciler:
        assert await cache_kib(poller) == 32 * 1024
        assert await cache_kib(reconciler) == 2000  # SQLite's default: -2000 (KiB)
    assert ledger_cache_mib(("ec-poller", "dynamics-poller")) == 32
    assert ledger_cache_mib(("writer",)) is None


async def test_opening_a_postgresql_ledger_waits_for_no_work_in_progress() -> None:
    """Services start together on one ledger: one opening it while another already writes
    must not wait for that write (DDL on a table waits for every transaction using it, and
    deadlocked services at start-up)."""
    async with postgres_schema() as url:
        async with open_store(url):
            pass  # the tables made, as the first service to start makes them
        working = await asyncpg.connect(url)  # its search_path is the test's schema
        try:
            async with working.transaction():
                # a service at work: a write in progress on tables an opening used to alter
                for table in ("history", "dyn_records", "outstanding_keys"):
                    await working.execute(f"LOCK TABLE {table} IN ROW EXCLUSIVE MODE")
                async with asyncio.timeout(10):
                    async with open_store(url) as store:
                        await store.get_checkpoint("acme", "x")
        finally:
            await working.close()


async def test_a_postgresql_ledger_of_older_tables_is_brought_up_to_date() -> None:
    async with postgres_schema() as url:
        async with open_store(url) as store:
            assert isinstance(store, PostgresLedgerStore)
            async with store._transaction() as db:
                await db.execute("ALTER TABLE history DROP COLUMN corrected_time")
                await db.execute("DELETE FROM meta WHERE name = 'ddl'")
        async with open_store(url) as store:
            assert isinstance(store, PostgresLedgerStore)
            async with store._transaction() as db:
                async with db.execute("SELECT value FROM meta WHERE name = 'ddl'") as cursor:
                    assert await cursor.fetchone() == (DDL_STAMP,)
                async with db.execute("SELECT corrected_time FROM history") as cursor:
                    assert await cursor.fetchall() == []


async def test_making_postgresql_tables_is_tried_again_after_a_deadlock(
        caplog: pytest.LogCaptureFixture) -> None:
    """A service brings older tables up to date while another, already at work, locks them in
    the other order: PostgreSQL fails one of the two; when it is the opening, it tries again."""
    async with postgres_schema() as url:
        async with open_store(url) as store:
            assert isinstance(store, PostgresLedgerStore)
            async with store._transaction() as db:
                await db.execute("DELETE FROM meta WHERE name = 'ddl'")  # as older tables are
        working = await asyncpg.connect(url)
        watching = await asyncpg.connect(url)
        second = open_store(url)
        try:
            # the one at work waits long before it looks for a deadlock: the opening finds it
            await working.execute("SET deadlock_timeout = '30s'")
            async with working.transaction():
                await working.execute("LOCK TABLE outstanding_keys IN ROW EXCLUSIVE MODE")
                opening = asyncio.create_task(second.open())
                # until the opening (holding history's lock) waits for outstanding_keys: no
                # event says so, PostgreSQL's lock table is asked
                await until(lambda: watching.fetchval(
                    "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
                    " WHERE c.relname = 'outstanding_keys' AND NOT l.granted"),
                    timeout_s=20, what="the opening waiting for outstanding_keys")
                await working.execute("LOCK TABLE history IN ROW EXCLUSIVE MODE")
            async with asyncio.timeout(20):
                await opening
        finally:
            await second.close()
            await working.close()
            await watching.close()
    assert "deadlocked with another process" in caplog.text


async def test_a_save_of_more_keys_than_postgres_holds_locks_for_goes_through(
        store: LedgerStore) -> None:
    """PostgreSQL keeps advisory locks in a shared table of max_locks_per_transaction x
    max_connections entries (6,400 by default); a save locks each email of its keys once, so
    30,000 keys of 6,000 emails take 6,000 (one per key ran it out: "out of shared memory")."""
    keys = [key(email=f"p{i}@example.com", pref=p) for i in range(6_000) for p in range(1, 6)]
    revisions = await store.save_rows([(None, key_tuple(k), EMPTY_STATE) for k in keys])
    assert revisions == [1] * len(keys)
    assert len(await store.load_rows(map(key_tuple, keys))) == len(keys)


async def test_a_save_of_more_stored_emails_than_postgres_holds_locks_for_goes_through(
        store: LedgerStore) -> None:
    """A save holds its stored keys by their rows, which PostgreSQL keeps in the rows
    themselves: 20,000 stored keys of 20,000 emails in one save (a lock per email ran the
    shared lock table out)."""
    keys = [key(email=f"p{i}@example.com", pref=1) for i in range(20_000)]
    for start in range(0, len(keys), 4_000):  # stored a few thousand emails at a time
        await store.save_rows([(None, key_tuple(k), EMPTY_STATE)
                               for k in keys[start:start + 4_000]])
    changed = EMPTY_STATE._replace(pending=((True, 1_000), None))
    revisions = await store.save_rows([(1, key_tuple(k), changed) for k in keys])
    assert revisions == [2] * len(keys)
    loaded = await store.load_rows(map(key_tuple, keys))
    assert {state.revision for state in loaded.values()} == {2}


async def test_decided_names_the_observations_whose_change_a_fold_decided(
        store: LedgerStore) -> None:
    def decision(k: PreferenceKey, change_id: str, decided: str, *, opted_in: bool = True,
                 side: Side = "dotdigital") -> HistoryEntry:
        return HistoryEntry(account=k.account, email=k.email, preference_id=k.preference_id,
                            side=side, opted_in=opted_in, origin_time=T, change_id=change_id,
                            decision=decided, recorded_at=T)

    def read(k: PreferenceKey, change_id: str, *, opted_in: bool = True,
             side: Side = "dotdigital") -> ObservationRow[KeyTuple]:
        return observation_row(Observation(key=k, side=side, opted_in=opted_in, origin_time=T,
                                           change_id=change_id, clock_epoch=UNKNOWN_EPOCH))

    ann, bob, theirs = key(), key("bob@example.com"), key(account="globex")
    await store.save([], history=[
        decision(ann, "ec:1", "applied"), decision(ann, "ec:2", "suppressed"),
        decision(ann, "ec:3", "tie_opt_in_lost"), decision(bob, "ec:4", "applied"),
        decision(theirs, "ec:5", "applied"), decision(ann, "ec:6", "ineligible")])
    again = [read(ann, "ec:1"), read(ann, "ec:3"), read(bob, "ec:4")]
    not_decided = [
        read(ann, "ec:1", opted_in=False),  # another value
        read(ann, "ec:1", side="dynamics"),  # another side
        read(key(pref=2), "ec:1"),  # another preference
        read(ann, "ec:2"),  # parked, not folded: folded when read again
        read(ann, "ec:6"),  # refused as ineligible: folded once eligible
        read(ann, "ec:5"),  # another account's decision
        read(ann, "ec:7"),  # never read before
    ]
    assert await store.decided([*again, *not_decided], decisions=FOLDED) == set(again)
    assert await store.decided([], decisions=FOLDED) == set()


async def test_the_dry_run_view_finds_decided_changes_in_the_ledger_and_its_own_history(
        store: LedgerStore) -> None:
    def decision(change_id: str) -> HistoryEntry:
        return HistoryEntry(account="acme", email=key().email, preference_id=key().preference_id,
                            side="dotdigital", opted_in=True, origin_time=T,
                            change_id=change_id, decision="applied", recorded_at=T)

    def read(change_id: str) -> ObservationRow[KeyTuple]:
        return observation_row(Observation(key=key(), side="dotdigital", opted_in=True,
                                           origin_time=T, change_id=change_id,
                                           clock_epoch=UNKNOWN_EPOCH))

    await store.save([], history=[decision("ec:1")])
    view = OverlayStore(store)
    await view.save([], history=[decision("ec:2")])
    asked = [read("ec:1"), read("ec:2"), read("ec:3")]
    assert await view.decided(asked, decisions=FOLDED) == {read("ec:1"), read("ec:2")}
    assert await store.decided(asked, decisions=FOLDED) == {read("ec:1")}  # the view's alone
