"""Coordination of replicas through the ledger store: leases, group membership, checkpoint swaps.

- A **lease** is held by one holder at a time until it expires; the holder renews it while it
  works (a poller run of one account) and releases it when done. A crashed holder's lease
  expires and another replica takes over.
- **Membership**: each replica of a service renews its row in the groups it belongs to (one per
  account) every second or so, with what it reports (the queues it consumes). Every replica
  reads the same live membership and derives the same shard assignment from it
  (``services.runtime.assignment``).
- **Checkpoint swap**: compare-and-set on a checkpoint value, for read-modify-write of values
  that several replicas update (the pending sync runs of an account).
- **Request budgets**: every process calling a vendor as the same API user claims tokens from
  one bucket of its budget (:mod:`common.vendors.budget` gives the rules), so that together
  they stay inside it. A claim is one short transaction; the bucket's row is updated first so
  that concurrent claims queue behind each other (SQLite's write lock, PostgreSQL's row lock)
  and each sees the claims before it.

Times come from the replica's own clock (integer microseconds); replicas on several machines
need synchronised clocks (NTP), well inside the seconds that leases and heartbeats last.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from common.store.connection import Transaction
from common.vendors.budget import BudgetGrant

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS lease (
        name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS member (
        grp TEXT NOT NULL, member TEXT NOT NULL, detail TEXT NOT NULL,
        expires_at INTEGER NOT NULL, PRIMARY KEY (grp, member))""",
    """CREATE TABLE IF NOT EXISTS budget (bucket TEXT PRIMARY KEY, claimed_at INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS budget_claim (
        bucket TEXT NOT NULL, claimer TEXT NOT NULL, claimed_at INTEGER NOT NULL,
        tokens INTEGER NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS budget_claim_by_time ON budget_claim (bucket, claimed_at)""",
)

# Taken when free, expired, or already ours (a renewal); RETURNING tells whether it was taken.
_ACQUIRE = """
    INSERT INTO lease (name, holder, expires_at) VALUES (?, ?, ?)
    ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
    WHERE lease.holder = excluded.holder OR lease.expires_at <= ?
    RETURNING holder"""

_HEARTBEAT = """
    INSERT INTO member (grp, member, detail, expires_at) VALUES (?, ?, ?, ?)
    ON CONFLICT (grp, member) DO UPDATE SET detail = excluded.detail,
        expires_at = excluded.expires_at"""

_SWAP_UPDATE = """
    UPDATE checkpoint SET value = ?, updated_at = ?
    WHERE account = ? AND source = ? AND value = ? RETURNING 1"""

_SWAP_INSERT = """
    INSERT INTO checkpoint (account, source, value, updated_at) VALUES (?, ?, ?, ?)
    ON CONFLICT (account, source) DO NOTHING RETURNING 1"""


_BUDGET_LOCK = """
    INSERT INTO budget (bucket, claimed_at) VALUES (?, ?)
    ON CONFLICT (bucket) DO UPDATE SET claimed_at = excluded.claimed_at"""

_BUDGET_HELD = """
    SELECT COALESCE(SUM(tokens), 0), MIN(claimed_at), COUNT(DISTINCT claimer),
        COALESCE(SUM(CASE WHEN claimer = ? THEN 1 ELSE 0 END), 0)
    FROM budget_claim WHERE bucket = ?"""


def _now_us() -> int:
    return time.time_ns() // 1000


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)


class SqlCoordination:
    """Leases, membership and checkpoint swaps in the store's own transactions."""

    def __init__(self, transaction: Transaction) -> None:
        self._transaction = transaction

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        now = _now_us()
        async with self._transaction() as db, \
                db.execute(_ACQUIRE, (name, holder, now + _us(ttl_s), now)) as cursor:
            return await cursor.fetchone() is not None

    async def renew_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Extend a lease that is still ours: once it expired, another replica may have held it
        (and released it) in between, so the work it guarded must stop."""
        now = _now_us()
        sql = ("UPDATE lease SET expires_at = ? WHERE name = ? AND holder = ? AND expires_at > ? "
               "RETURNING 1")
        async with self._transaction() as db, \
                db.execute(sql, (now + _us(ttl_s), name, holder, now)) as cursor:
            return await cursor.fetchone() is not None

    async def release_lease(self, name: str, holder: str) -> None:
        async with self._transaction() as db:
            await db.execute("DELETE FROM lease WHERE name = ? AND holder = ?", (name, holder))

    async def lease_holder(self, name: str) -> str | None:
        sql = "SELECT holder FROM lease WHERE name = ? AND expires_at > ?"
        async with self._transaction() as db, db.execute(sql, (name, _now_us())) as cursor:
            row = await cursor.fetchone()
        return None if row is None else str(row[0])

    async def heartbeat(self, member: str, details: Mapping[str, str],
                        ttl_s: float) -> dict[str, dict[str, str]]:
        now = _now_us()
        groups = sorted(details)
        if not groups:
            return {}
        async with self._transaction() as db:
            await db.executemany(_HEARTBEAT, [(g, member, details[g], now + _us(ttl_s))
                                              for g in groups])
            await db.execute("DELETE FROM member WHERE expires_at <= ?", (now,))
            marks = ",".join("?" * len(groups))
            sql = (f"SELECT grp, member, detail FROM member WHERE grp IN ({marks}) "
                   "ORDER BY grp, member")
            async with db.execute(sql, groups) as cursor:
                rows = await cursor.fetchall()
        live: dict[str, dict[str, str]] = {g: {} for g in groups}
        for group, name, detail in rows:
            live[str(group)][str(name)] = str(detail)
        return live

    async def leave(self, member: str, groups: Iterable[str]) -> None:
        async with self._transaction() as db:
            await db.executemany("DELETE FROM member WHERE grp = ? AND member = ?",
                                 [(g, member) for g in groups])

    async def members(self, group: str) -> dict[str, str]:
        sql = ("SELECT member, detail FROM member WHERE grp = ? AND expires_at > ? "
               "ORDER BY member")
        async with self._transaction() as db, db.execute(sql, (group, _now_us())) as cursor:
            return {str(m): str(d) for m, d in await cursor.fetchall()}

    async def swap_checkpoint(self, account: str, source: str, expected: str | None,
                              value: str) -> bool:
        now = _now_us()
        async with self._transaction() as db:
            if expected is None:
                execution = db.execute(_SWAP_INSERT, (account, source, value, now))
            else:
                execution = db.execute(_SWAP_UPDATE, (value, now, account, source, expected))
            async with execution as cursor:
                return await cursor.fetchone() is not None

    async def claim_budget(self, bucket: str, claimer: str, *, tokens: int, limit: int,
                           span_s: float) -> BudgetGrant:
        async with self._transaction() as db:
            await db.execute(_BUDGET_LOCK, (bucket, _now_us()))
            # read once the bucket is ours: a claim stamped before a wait for the lock would
            # be forgotten that much before its tokens are spent
            now = _now_us()
            await db.execute("DELETE FROM budget_claim WHERE bucket = ? AND claimed_at <= ?",
                             (bucket, now - _us(span_s)))
            async with db.execute(_BUDGET_HELD, (claimer, bucket)) as cursor:
                held, oldest, claimers, mine = await cursor.fetchone()
            granted = max(0, min(tokens, limit - int(held)))
            if granted:
                await db.execute("INSERT INTO budget_claim (bucket, claimer, claimed_at, tokens) "
                                 "VALUES (?, ?, ?, ?)", (bucket, claimer, now, granted))
        wait_us = 0 if granted or oldest is None else int(oldest) + _us(span_s) - now
        return BudgetGrant(tokens=granted, wait_s=wait_us / 1_000_000,
                           claimers=int(claimers) + (0 if mine else 1))
