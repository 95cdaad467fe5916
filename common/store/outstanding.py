"""The index of keys with outstanding writes, for the outstanding-work sweep (services.reconciler.sweep).

A key is outstanding while a side is not known to hold its register's value
(:func:`common.domain.outstanding` is not empty). Every save of key states keeps this index in
step in the same transaction, so the sweep finds such keys by age without decoding the states
of the whole ledger. Per key:

- ``since``: when the register's current value became outstanding (a new value starts again);
- ``due_at``: when the sweep may publish the key's writes (again): ``since`` at first, later
  than that after each sweep (it backs off);
- ``revision``: the key state's revision the row was last written with, so that the sweep drops
  a row it found settled only if no later save has written it;
- ``sides``: which sides are owed the write (1 Dynamics, 2 dotdigital, 3 both). A key owed only
  to Dynamics, whose email has no active eligible record (all inactive, qualified or deleted),
  is left out like a suppressed contact's: nothing can take the write until a record is active
  again, which brings it back.

A ledger made before the index existed builds it once, one page of states at a time
(:meth:`SqlOutstanding.build`), from the accounts :func:`upgrade` lists when it creates it.
Rows are written in key order (in saves too), so that PostgreSQL transactions touching the same
rows never wait for each other in a cycle.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from common.domain import PreferenceKey
from common.domain.kernel import outstanding_rows
from common.domain.rows import KeyTuple, StateRow
from common.store.codec import decode_row, from_us, to_us
from common.store.connection import Connection, Transaction

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS outstanding_keys (
        account TEXT NOT NULL, email TEXT NOT NULL, preference_id INTEGER NOT NULL,
        revision INTEGER NOT NULL, opted_in INTEGER NOT NULL, origin_time INTEGER NOT NULL,
        since INTEGER NOT NULL, due_at INTEGER NOT NULL, sweeps INTEGER NOT NULL,
        sides INTEGER NOT NULL DEFAULT 3,
        PRIMARY KEY (account, email, preference_id))""",
    # The sweep asks by due time; the counts for the metrics read the account's rows, which
    # are few but for a backlog (one index less for every save to keep).
    "CREATE INDEX IF NOT EXISTS outstanding_keys_due ON outstanding_keys (account, due_at)",
)

# Checkpoint (per account) of the one-time build: '' from the start, then the last key indexed.
BUILD = "ledger:outstanding-index"
_BUILT = "done"

# A new register value starts the clock (and the sweeps) again; the same one keeps them.
_UPSERT = """
    INSERT INTO outstanding_keys (account, email, preference_id, revision, opted_in, origin_time,
                                  since, due_at, sides, sweeps)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0)
    ON CONFLICT (account, email, preference_id) DO UPDATE SET
        revision = excluded.revision, opted_in = excluded.opted_in,
        origin_time = excluded.origin_time, sides = excluded.sides,
        since = CASE WHEN outstanding_keys.opted_in = excluded.opted_in
                      AND outstanding_keys.origin_time = excluded.origin_time
                     THEN outstanding_keys.since ELSE excluded.since END,
        due_at = CASE WHEN outstanding_keys.opted_in = excluded.opted_in
                       AND outstanding_keys.origin_time = excluded.origin_time
                      THEN outstanding_keys.due_at ELSE excluded.due_at END,
        sweeps = CASE WHEN outstanding_keys.opted_in = excluded.opted_in
                       AND outstanding_keys.origin_time = excluded.origin_time
                      THEN outstanding_keys.sweeps ELSE 0 END"""

_DELETE = "DELETE FROM outstanding_keys WHERE account = ? AND email = ? AND preference_id = ?"

# Suppressed contacts are left out: their writes are parked on purpose. So are keys owed only
# to Dynamics whose email has no active eligible record: nothing can take the write.
_NOT_SUPPRESSED = """
    FROM outstanding_keys o
    LEFT JOIN contact_state c ON c.account = o.account AND c.email = o.email
    WHERE o.account = ? AND o.since <= ? AND (c.suppressed IS NULL OR c.suppressed = 0)
      AND NOT (o.sides = 1 AND NOT EXISTS (
          SELECT 1 FROM dyn_records r WHERE r.account = o.account AND r.email = o.email
          AND r.eligible = 1 AND r.active = 1))"""
# by side code (common.domain.sides.SIDE_CODES)
_SIDE_BITS = (1, 2)


def _first(item: tuple[KeyTuple, StateRow, int]) -> KeyTuple:
    return item[0]


@dataclass(frozen=True, kw_only=True, slots=True)
class DueKey:
    """A key the sweep may publish the writes of; ``sweeps``: how often it already did."""

    key: PreferenceKey
    revision: int
    sweeps: int


@dataclass(frozen=True, kw_only=True, slots=True)
class OutstandingStats:
    """Keys outstanding since before some moment, and since when the oldest of them is."""

    keys: int
    oldest: datetime | None


def _order(key: PreferenceKey) -> tuple[str, str, int]:
    return key.account, key.email, key.preference_id


def index_rows(states: Iterable[tuple[KeyTuple, StateRow, int]], *, now_us: int
               ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """What a save of ``states`` (each key's parts, its state's row and its new revision) does
    to the index: (rows to upsert, keys to delete), in key order."""
    upsert: list[tuple[Any, ...]] = []
    delete: list[tuple[Any, ...]] = []
    for key, row, revision in sorted(states, key=_first):
        register = row[0]
        owed = outstanding_rows(register, row[1]) if register is not None else ()
        if register is not None and owed:
            sides = _SIDE_BITS[owed[0][0]] | _SIDE_BITS[owed[-1][0]]
            upsert.append((*key, revision, int(register[0]), register[1], now_us, now_us,
                           sides))
        else:
            delete.append(key)
    return upsert, delete


def index_statements(upsert: Sequence[tuple[Any, ...]], delete: Sequence[tuple[Any, ...]]
                     ) -> list[tuple[str, Sequence[tuple[Any, ...]]]]:
    """What a save runs on the index, inside its transaction: (statement, rows) pairs, each
    for ``executemany``."""
    return [(sql, rows) for sql, rows in ((_UPSERT, upsert), (_DELETE, delete)) if rows]


async def write_index(db: Connection, upsert: Sequence[tuple[Any, ...]],
                      delete: Sequence[tuple[Any, ...]]) -> None:
    """Inside a save's transaction."""
    for sql, rows in index_statements(upsert, delete):
        await db.executemany(sql, rows)


async def upgrade(db: Connection) -> None:
    """At start-up, inside the schema transaction: when the index is new to this ledger, every
    account that already has key states builds it (a new ledger has none)."""
    async with db.execute("INSERT INTO meta (name, value) VALUES ('outstanding-index', '1') "
                          "ON CONFLICT (name) DO NOTHING RETURNING name") as cursor:
        created = await cursor.fetchone() is not None
    if created:
        # WHERE true: SQLite's parser needs it before ON CONFLICT in an INSERT ... SELECT
        await db.execute("INSERT INTO checkpoint (account, source, value, updated_at) "
                         "SELECT DISTINCT account, CAST(? AS TEXT), '', CAST(? AS BIGINT) "
                         "FROM key_state WHERE true "
                         "ON CONFLICT (account, source) DO NOTHING", (BUILD, time.time_ns() // 1000))


class SqlOutstanding:
    """The sweep's queries of the index, one transaction per call."""

    def __init__(self, transaction: Transaction, *, reading: Transaction | None = None) -> None:
        self._transaction = transaction
        self._reading = reading or transaction

    async def stats(self, account: str, *, since_before: datetime) -> OutstandingStats:
        async with self._reading() as db, \
                db.execute(f"SELECT COUNT(*), MIN(o.since) {_NOT_SUPPRESSED}",
                           (account, to_us(since_before))) as cursor:
            row = await cursor.fetchone()
        count, oldest = (row[0], row[1]) if row is not None else (0, None)
        return OutstandingStats(keys=int(count or 0),
                                oldest=None if oldest is None else from_us(int(oldest)))

    async def due(self, account: str, *, since_before: datetime, now: datetime,
                  limit: int) -> list[DueKey]:
        sql = (f"SELECT o.email, o.preference_id, o.revision, o.sweeps {_NOT_SUPPRESSED} "
               "AND o.due_at <= ? ORDER BY o.due_at, o.email, o.preference_id LIMIT ?")
        async with self._reading() as db, \
                db.execute(sql, (account, to_us(since_before), to_us(now), limit)) as cursor:
            rows = await cursor.fetchall()
        return [DueKey(key=PreferenceKey(account=account, email=str(email),
                                         preference_id=int(preference_id)),
                       revision=int(revision), sweeps=int(sweeps))
                for email, preference_id, revision, sweeps in rows]

    async def postpone(self, due: Sequence[tuple[PreferenceKey, datetime]]) -> None:
        rows = [(to_us(at), k.account, k.email, k.preference_id)
                for k, at in sorted(due, key=lambda d: _order(d[0]))]
        if rows:
            async with self._transaction() as db:
                await db.executemany(
                    "UPDATE outstanding_keys SET due_at = ?, sweeps = sweeps + 1 "
                    "WHERE account = ? AND email = ? AND preference_id = ?", rows)

    async def drop(self, settled: Sequence[tuple[PreferenceKey, int]]) -> None:
        rows = [(k.account, k.email, k.preference_id, revision)
                for k, revision in sorted(settled, key=lambda s: _order(s[0]))]
        if rows:
            async with self._transaction() as db:
                await db.executemany(f"{_DELETE} AND revision <= ?", rows)

    async def build(self, account: str, *, limit: int, now_us: int) -> bool:
        """Index one page of ``account``'s states saved before the index existed; True once
        there is nothing (more) to do."""
        async with self._transaction() as db:
            async with db.execute("SELECT value FROM checkpoint WHERE account = ? AND source = ?",
                                  (account, BUILD)) as cursor:
                row = await cursor.fetchone()
            if row is None or row[0] == _BUILT:
                return True
            after = orjson.loads(row[0]) if row[0] else ["", -1]
            sql = ("SELECT email, preference_id, revision, state FROM key_state "
                   "WHERE account = ? AND (email, preference_id) > (?, CAST(? AS BIGINT)) "
                   "ORDER BY email, preference_id LIMIT ?")
            async with db.execute(sql, (account, after[0], after[1], limit)) as cursor:
                rows = list(await cursor.fetchall())
            states = [((account, str(email), int(preference_id)),
                       decode_row(PreferenceKey(account=account, email=str(email),
                                                preference_id=int(preference_id)),
                                  int(revision), bytes(blob)), int(revision))
                      for email, preference_id, revision, blob in rows]
            upsert, _ = index_rows(states, now_us=now_us)
            if upsert:
                # a row a save wrote meanwhile is newer than this one
                await db.executemany(
                    "INSERT INTO outstanding_keys (account, email, preference_id, revision, "
                    "opted_in, origin_time, since, due_at, sides, sweeps) VALUES (?, ?, ?, ?, ?, "
                    "?, ?, ?, ?, 0) ON CONFLICT (account, email, preference_id) DO NOTHING",
                    upsert)
            done = len(rows) < limit
            position = _BUILT if done else orjson.dumps(
                [str(rows[-1][0]), int(rows[-1][1])]).decode()
            await db.execute("UPDATE checkpoint SET value = ?, updated_at = ? "
                             "WHERE account = ? AND source = ?",
                             (position, now_us, account, BUILD))
        return done
