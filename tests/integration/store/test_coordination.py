"""Leases, membership and checkpoint swaps: what replicas coordinate through, on both backends.

Two store instances on the same database stand for two replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3

import asyncpg
import pytest

from common.domain import KeyState, PreferenceKey
from common.domain.rows import EMPTY_STATE, key_tuple
from common.store import ConflictError, LedgerStore, SqliteLedgerStore, open_store
from tests.harness.waiting import until

from .stepped_clock import SteppedClock

pytestmark = pytest.mark.anyio


async def test_a_lease_has_one_holder_until_released_or_expired(
        store: LedgerStore, other: LedgerStore, clock: SteppedClock) -> None:
    assert await store.acquire_lease("acme:dynamics-poller", "r1", ttl_s=30)
    assert not await other.acquire_lease("acme:dynamics-poller", "r2", ttl_s=30)
    assert await store.acquire_lease("acme:dynamics-poller", "r1", ttl_s=30)   # renewal
    assert await other.acquire_lease("globex:dynamics-poller", "r2", ttl_s=30)  # another lease
    assert await other.lease_holder("acme:dynamics-poller") == "r1"
    await other.release_lease("acme:dynamics-poller", "r2")                    # not its lease
    assert await other.lease_holder("acme:dynamics-poller") == "r1"
    await store.release_lease("acme:dynamics-poller", "r1")
    assert await other.lease_holder("acme:dynamics-poller") is None
    assert await other.acquire_lease("acme:dynamics-poller", "r2", ttl_s=0.2)
    assert not await store.acquire_lease("acme:dynamics-poller", "r1", ttl_s=30)
    clock.advance(0.3)                                                          # r2 went quiet
    assert await store.acquire_lease("acme:dynamics-poller", "r1", ttl_s=30)


async def test_racing_replicas_get_a_lease_once(url: str) -> None:
    stores = [open_store(url) for _ in range(4)]
    for s in stores:
        await s.open()
    try:
        won = await asyncio.gather(*(s.acquire_lease("acme:ec-poller", f"r{i}", ttl_s=30)
                                     for i, s in enumerate(stores)))
    finally:
        for s in stores:
            await s.close()
    assert sum(won) == 1


async def test_membership_lists_live_members_with_their_detail(
        store: LedgerStore, other: LedgerStore, clock: SteppedClock) -> None:
    live = await store.heartbeat("r1", {"reconciler/acme": "[0]", "reconciler/globex": "[]"},
                                 ttl_s=30)
    assert live == {"reconciler/acme": {"r1": "[0]"}, "reconciler/globex": {"r1": "[]"}}
    live = await other.heartbeat("r2", {"reconciler/acme": "[1]"}, ttl_s=0.2)
    assert live == {"reconciler/acme": {"r1": "[0]", "r2": "[1]"}}
    clock.advance(0.3)                                                          # r2 stopped
    assert await store.members("reconciler/acme") == {"r1": "[0]"}
    await store.leave("r1", ["reconciler/acme"])
    assert await other.members("reconciler/acme") == {}
    assert await other.members("reconciler/globex") == {"r1": "[]"}
    assert await store.heartbeat("r1", {}, ttl_s=30) == {}


async def test_checkpoint_swap_is_compare_and_set(store: LedgerStore, other: LedgerStore) -> None:
    assert await store.swap_checkpoint("acme", "pending", None, "a")
    assert not await other.swap_checkpoint("acme", "pending", None, "b")       # exists now
    assert not await other.swap_checkpoint("acme", "pending", "x", "b")        # not "x"
    assert await other.swap_checkpoint("acme", "pending", "a", "b")
    assert await store.get_checkpoint("acme", "pending") == "b"
    assert await store.get_checkpoint("globex", "pending") is None


async def test_concurrent_saves_of_one_key_conflict(url: str) -> None:
    """Replicas folding the same new key at once: one save wins, the other gets a conflict."""
    stores = [open_store(url) for _ in range(4)]
    for s in stores:
        await s.open()
    key = PreferenceKey(account="acme", email="ann@example.com", preference_id=1)
    try:
        results: list[list[int] | BaseException] = list(await asyncio.gather(
            *(s.save([(None, KeyState(key=key), None)]) for s in stores), return_exceptions=True))
        assert sum(r == [1] for r in results) == 1, results
        assert all(isinstance(r, ConflictError) for r in results if r != [1])
        # and again on the stored revision, with two keys in opposite orders (no deadlock)
        other = PreferenceKey(account="acme", email="bob@example.com", preference_id=1)
        await stores[0].save([(None, KeyState(key=other), None)])
        results = list(await asyncio.gather(
            stores[1].save([(1, KeyState(key=key), None), (1, KeyState(key=other), None)]),
            stores[2].save([(1, KeyState(key=other), None), (1, KeyState(key=key), None)]),
            return_exceptions=True))
        assert sum(r == [2, 2] for r in results) == 1, results
        assert any(isinstance(r, ConflictError) for r in results), results
    finally:
        for s in stores:
            await s.close()


async def test_key_states_held_are_saved_by_no_one_else_until_the_hold_ends(
        store: LedgerStore, url: str) -> None:
    """SQLite holds its key states for a load and a save (a save there cannot meet a
    conflict): another process's save waits for the hold to end, and then meets the conflict
    instead. PostgreSQL holds none: its replicas save at once, each locking its own rows."""
    key = ("acme", "ann@example.com", 1)
    holding = store.holding()
    if not url.startswith("sqlite"):
        assert holding is None
        return
    assert holding is not None
    await store.save_rows([(None, key, EMPTY_STATE)])
    # another process that does not wait for SQLite's write lock
    other = SqliteLedgerStore(path=url.removeprefix("sqlite:///"), busy_timeout_s=0)
    await other.open()
    try:
        assert (await other.load_rows([key]))[key].revision == 1
        async with holding as held:
            assert (await held.load_rows([key]))[key].revision == 1
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                await other.save_rows([(1, key, EMPTY_STATE)])
            assert await held.save_rows([(1, key, EMPTY_STATE)]) == [2]
        with pytest.raises(ConflictError):  # it loaded revision 1: the hold saved over it
            await other.save_rows([(1, key, EMPTY_STATE)])
        assert (await other.load_rows([key]))[key].revision == 2
    finally:
        await other.close()


async def test_a_lapsed_lease_is_not_renewed(store: LedgerStore, other: LedgerStore,
                                             clock: SteppedClock) -> None:
    assert await store.acquire_lease("acme:ec-poller", "r1", ttl_s=0.2)
    assert await store.renew_lease("acme:ec-poller", "r1", ttl_s=0.2)
    assert not await other.renew_lease("acme:ec-poller", "r2", ttl_s=30)      # not its lease
    clock.advance(0.3)
    # r1 stalled past its lease: r2 may have run and released meanwhile; r1 must stop
    assert await other.acquire_lease("acme:ec-poller", "r2", ttl_s=30)
    await other.release_lease("acme:ec-poller", "r2")
    assert not await store.renew_lease("acme:ec-poller", "r1", ttl_s=30)


async def test_a_save_caught_in_a_deadlock_is_a_conflict(store: LedgerStore, url: str) -> None:
    """PostgreSQL breaks a deadlock by failing one of its transactions: when that is a save, it
    is a conflict (its caller loads the keys again and tries again), not an error."""
    if not url.startswith("postgres"):
        pytest.skip("SQLite serialises writers: a save never waits for another's rows")
    ann, bob = (key_tuple(PreferenceKey(account="acme", email=e, preference_id=1))
                for e in ("ann@example.com", "bob@example.com"))
    await store.save_rows([(None, ann, EMPTY_STATE), (None, bob, EMPTY_STATE)])
    changed = EMPTY_STATE._replace(pending=((True, 1_000), None))
    holder = await asyncpg.connect(url)
    watcher = await asyncpg.connect(url)
    try:
        # the save's wait, not this one's, is the one PostgreSQL finds the deadlock in
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await holder.execute("SET deadlock_timeout = '60s'")
        held = holder.transaction()
        await held.start()
        lock = "SELECT 1 FROM key_state WHERE email = $1 FOR UPDATE"
        await holder.execute(lock, "bob@example.com")
        saving = asyncio.ensure_future(store.save_rows([(1, ann, changed), (1, bob, changed)]))
        # the save holds ann's row and waits for bob's (PostgreSQL tells of no such event).
        # Watched from a connection of its own: inside the holder's transaction,
        # pg_stat_activity answers what its first look saw, every time.
        await until(lambda: watcher.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE '%UPDATE key_state%'"),
            timeout_s=20, every=0.01, what="the save waiting for bob's row lock")
        locking = asyncio.ensure_future(holder.execute(lock, "ann@example.com"))
        with pytest.raises(ConflictError):
            await saving
        await locking  # the save gave way
        await held.rollback()
    finally:
        await holder.close()
        await watcher.close()
    assert await store.save_rows([(1, ann, changed), (1, bob, changed)]) == [2, 2]
