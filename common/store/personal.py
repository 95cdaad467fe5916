"""Personal data in the ledger: erasing one email, and pruning history past its retention.

The ledger holds, per (account, email): the key states (each preference's register, what each
side holds, pending writes and the write ledger of our recent writes), the writes in flight of
the open write batches (:mod:`common.store.write_batches`), the history of decisions
and writes, the dotdigital contact state, observations parked while the contact is suppressed,
dotdigital writes deferred until a complete read, and the Dynamics record directory (records
with that email and their subscription rows).

Rules:

1. ``forget`` removes every row of every table above for one (account, email), in one
   transaction, and returns how many rows of each it removed. Nothing else is touched: other
   emails, other accounts, checkpoints, leases.
2. ``prune_history`` removes history rows recorded before a time, in short transactions of at
   most ``limit`` rows (the SQLite write lock is shared with the services). Key states are
   never pruned: the registers and the write ledger are what the sync's correctness rests on.
3. ``ERASED`` names every table that holds an email; a table with an ``email`` column that is
   not listed is a gap (tests/integration/privacy checks the schema against it).
4. A write batch holds the writes of many emails in one row: erasing one email rewrites the
   account's open batches without its writes, and counts those writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from common.domain import normalize_email
from common.store.codec import to_us
from common.store.connection import Connection, Transaction
from common.store.history import BY_EMAIL as HISTORY_BY_EMAIL
from common.store.history import history_bucket
from common.store.write_batches import count_email, without_email

# History by age, for retention (the by-email index does not serve a time range).
SCHEMA = (
    "CREATE INDEX IF NOT EXISTS history_by_time ON history (account, recorded_at)",
)

# What each erased table's rows are, as ``prefsync forget`` reports them, in deletion order
# (subscription rows before the records that lead to them).
ERASED: Mapping[str, str] = {
    "key_state": "preference states (registers and the write ledger)",
    "write_batches": "writes in flight (begun, their outcome not yet recorded)",
    "history": "history rows",
    "contact_state": "dotdigital contact states",
    "parked_observations": "parked values (contact suppressed)",
    "deferred_writes": "deferred dotdigital writes",
    "outstanding_keys": "keys waiting for a write (the sweep's index)",
    "resuming_contacts": "resubscriptions whose writes are not yet published",
    "dyn_subscriptions": "Dynamics subscription rows of those records",
    "dyn_follow_ups": "eligibility follow-ups of those records",
    "dyn_email_changes": "email changes of records, not yet followed",
    "dyn_records": "Dynamics records in the directory",
}

# The rows of one (account, email) in each table; ``?`` are account, email (and again for the
# tables keyed by record, found through the records that hold the email).
_WHERE = dict.fromkeys(ERASED, "WHERE account = ? AND email = ?")
# tables keyed by record: the rows of the records that hold the email (erased before them)
_BY_RECORD = ("dyn_subscriptions", "dyn_follow_ups")
for _table in _BY_RECORD:
    _WHERE[_table] = ("WHERE account = ? AND record_id IN "
                      "(SELECT record_id FROM dyn_records WHERE account = ? AND email = ?)")


_WHERE["dyn_email_changes"] = "WHERE account = ? AND (email = ? OR old_email = ?)"
# history by its email's bucket (common.store.history: no index by email)
_WHERE["history"] = f"WHERE {HISTORY_BY_EMAIL}"


def _params(table: str, account: str, email: str) -> tuple[str | int, ...]:
    if table == "dyn_email_changes":
        return (account, email, email)
    if table == "history":
        return (account, history_bucket(email), email)
    if table in _BY_RECORD:
        return (account, account, email)
    return (account, email)


_BATCHES = "SELECT id, writes FROM write_batches WHERE account = ?"


async def _count(db: Connection, table: str, account: str, email: str) -> int:
    if table == "write_batches":
        async with db.execute(_BATCHES, (account,)) as cursor:
            return sum(count_email(bytes(blob), email) for _, blob in await cursor.fetchall())
    async with db.execute(f"SELECT COUNT(*) FROM {table} {_WHERE[table]}",
                          _params(table, account, email)) as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row is not None else 0


async def _forget_in_batches(db: Connection, account: str, email: str) -> int:
    """Rule 4."""
    async with db.execute(_BATCHES, (account,)) as cursor:
        batches = list(await cursor.fetchall())
    removed = 0
    for batch_id, blob in batches:
        kept, taken = without_email(bytes(blob), email)
        if taken:
            await db.execute("UPDATE write_batches SET writes = ? WHERE account = ? AND id = ?",
                             (kept, account, batch_id))
            removed += taken
    return removed


class SqlPersonalData:
    """Erasure and retention in the store's own transactions (SQLite and PostgreSQL alike)."""

    def __init__(self, transaction: Transaction, *, reading: Transaction | None = None) -> None:
        self._transaction = transaction
        self._reading = reading or transaction

    async def held(self, account: str, email: str) -> dict[str, int]:
        """Rows held for one email, per table of :data:`ERASED` (nothing is changed)."""
        email = normalize_email(email)
        async with self._reading() as db:
            return {table: await _count(db, table, account, email) for table in ERASED}

    async def forget(self, account: str, email: str) -> dict[str, int]:
        """Remove everything held for one email in one account; rows removed per table."""
        email = normalize_email(email)
        removed: dict[str, int] = {}
        async with self._transaction() as db:
            for table in ERASED:
                if table == "write_batches":
                    removed[table] = await _forget_in_batches(db, account, email)
                    continue
                async with db.execute(f"DELETE FROM {table} {_WHERE[table]} RETURNING 1",
                                      _params(table, account, email)) as cursor:
                    removed[table] = len(list(await cursor.fetchall()))
        return removed

    async def prune_history(self, account: str, *, before: datetime, limit: int) -> int:
        """Remove up to ``limit`` of the account's history rows recorded before ``before``,
        oldest first; returns how many (fewer than ``limit``: nothing older is left)."""
        sql = ("DELETE FROM history WHERE id IN (SELECT id FROM history WHERE account = ? "
               "AND recorded_at < ? ORDER BY recorded_at LIMIT ?) RETURNING 1")
        async with self._transaction() as db, \
                db.execute(sql, (account, to_us(before), limit)) as cursor:
            return len(list(await cursor.fetchall()))
