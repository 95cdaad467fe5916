"""The Dynamics record directory: which record has which email, which records are eligible,
and which subscription row holds which record's preference.

The dynamics-poller keeps it current from change tracking; the reconciler asks it whether an
email is eligible (ever in an email-activated marketing list) and the writer which records and
rows to write. Eligibility is never taken back: a record that leaves the list keeps syncing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import aiosqlite

RecordType = Literal["contact", "lead", "account"]
_CHUNK = 500

SCHEMA = """
CREATE TABLE IF NOT EXISTS dyn_records (
    account TEXT NOT NULL,
    record_id TEXT NOT NULL,
    record_type TEXT NOT NULL,
    email TEXT,
    active INTEGER NOT NULL DEFAULT 1,
    eligible INTEGER NOT NULL DEFAULT 0,
    eligible_at TEXT,
    PRIMARY KEY (account, record_id)
);
CREATE INDEX IF NOT EXISTS dyn_records_email ON dyn_records (account, email);
CREATE TABLE IF NOT EXISTS dyn_subscriptions (
    account TEXT NOT NULL,
    subscription_id TEXT NOT NULL,
    record_id TEXT NOT NULL,
    preference_row_id TEXT NOT NULL,
    opted_in INTEGER NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (account, subscription_id)
);
CREATE INDEX IF NOT EXISTS dyn_subscriptions_pair
    ON dyn_subscriptions (account, record_id, preference_row_id);
CREATE TABLE IF NOT EXISTS deferred_writes (
    account TEXT NOT NULL,
    preference_id INTEGER NOT NULL,
    email TEXT NOT NULL,
    PRIMARY KEY (account, preference_id, email)
);
"""


@dataclass(frozen=True, kw_only=True, slots=True)
class RecordRef:
    record_type: RecordType
    record_id: str
    email: str | None
    active: bool = True
    eligible: bool = False
    eligible_at: str | None = None  # ISO time this record became eligible


@dataclass(frozen=True, kw_only=True, slots=True)
class SubscriptionRow:
    subscription_id: str
    record_id: str
    preference_row_id: str
    opted_in: bool
    version: int


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start:start + _CHUNK]


def _marks(n: int) -> str:
    return ",".join("?" * n)


class SqliteDirectory:
    """Directory tables on the ledger's SQLite connection (each call commits on its own)."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def create(self) -> None:
        await self._db.executescript(SCHEMA)
        await self._db.commit()

    async def upsert_records(self, account: str, records: Sequence[RecordRef]) -> None:
        if not records:
            return
        await self._db.executemany(
            "INSERT INTO dyn_records (account, record_id, record_type, email, active) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (account, record_id) DO UPDATE SET "
            "record_type = excluded.record_type, email = excluded.email, "
            "active = excluded.active",
            [(account, r.record_id, r.record_type, r.email, int(r.active)) for r in records])
        await self._db.commit()

    async def forget_records(self, account: str, record_ids: Sequence[str]) -> None:
        for chunk in _chunks(list(record_ids)):
            await self._db.execute(
                f"DELETE FROM dyn_records WHERE account = ? AND record_id IN ({_marks(len(chunk))})",
                (account, *chunk))
        await self._db.commit()

    async def mark_eligible(self, account: str, record_ids: Sequence[str]) -> set[str]:
        """Mark records eligible for good; returns the ones that were not eligible before."""
        unique = sorted(set(record_ids))
        already: set[str] = set()
        for chunk in _chunks(unique):
            async with self._db.execute(
                    f"SELECT record_id FROM dyn_records WHERE account = ? AND eligible = 1 "
                    f"AND record_id IN ({_marks(len(chunk))})", (account, *chunk)) as cursor:
                already.update(str(row[0]) for row in await cursor.fetchall())
        newly = [r for r in unique if r not in already]
        if newly:
            now = datetime.now(UTC).isoformat()
            # A member not yet in the directory is kept as a placeholder until its row is read.
            await self._db.executemany(
                "INSERT INTO dyn_records (account, record_id, record_type, email, active, "
                "eligible, eligible_at) VALUES (?, ?, 'contact', NULL, 1, 1, ?) "
                "ON CONFLICT (account, record_id) DO UPDATE SET eligible = 1, "
                "eligible_at = excluded.eligible_at", [(account, r, now) for r in newly])
            await self._db.commit()
        return set(newly)

    async def records(self, account: str, record_ids: Sequence[str]) -> dict[str, RecordRef]:
        found: dict[str, RecordRef] = {}
        for chunk in _chunks(sorted(set(record_ids))):
            async with self._db.execute(
                    "SELECT record_id, record_type, email, active, eligible FROM dyn_records "
                    f"WHERE account = ? AND record_id IN ({_marks(len(chunk))})",
                    (account, *chunk)) as cursor:
                for row in await cursor.fetchall():
                    found[str(row[0])] = RecordRef(
                        record_id=str(row[0]), record_type=row[1], email=row[2],
                        active=bool(row[3]), eligible=bool(row[4]))
        return found

    async def emails_of_records(self, account: str, record_ids: Sequence[str]) -> set[str]:
        return {r.email for r in (await self.records(account, record_ids)).values()
                if r.email is not None}

    async def records_for_emails(self, account: str,
                                 emails: Iterable[str]) -> dict[str, list[RecordRef]]:
        """Eligible records per email (several records may share one email)."""
        found: dict[str, list[RecordRef]] = {}
        for chunk in _chunks(sorted(set(emails))):
            async with self._db.execute(
                    "SELECT record_id, record_type, email, active, eligible_at FROM dyn_records "
                    f"WHERE account = ? AND eligible = 1 AND email IN ({_marks(len(chunk))}) "
                    "ORDER BY record_id", (account, *chunk)) as cursor:
                for row in await cursor.fetchall():
                    found.setdefault(row[2], []).append(RecordRef(
                        record_id=str(row[0]), record_type=row[1], email=row[2],
                        active=bool(row[3]), eligible=True, eligible_at=row[4]))
        return found

    async def eligible_emails(self, account: str, emails: Iterable[str]) -> set[str]:
        return set(await self.records_for_emails(account, emails))

    async def upsert_subscriptions(self, account: str, rows: Sequence[SubscriptionRow]) -> None:
        if not rows:
            return
        await self._db.executemany(
            "INSERT INTO dyn_subscriptions (account, subscription_id, record_id, "
            "preference_row_id, opted_in, version) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (account, subscription_id) DO UPDATE SET opted_in = excluded.opted_in, "
            "version = excluded.version WHERE excluded.version >= dyn_subscriptions.version",
            [(account, r.subscription_id, r.record_id, r.preference_row_id, int(r.opted_in),
              r.version) for r in rows])
        await self._db.commit()

    async def forget_subscriptions(self, account: str, subscription_ids: Sequence[str]) -> None:
        for chunk in _chunks(list(subscription_ids)):
            await self._db.execute(
                "DELETE FROM dyn_subscriptions WHERE account = ? AND subscription_id IN "
                f"({_marks(len(chunk))})", (account, *chunk))
        await self._db.commit()

    async def subscriptions_for(
            self, account: str, pairs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], SubscriptionRow]:
        """Known subscription rows by (record id, preference row id)."""
        wanted = set(pairs)
        found: dict[tuple[str, str], SubscriptionRow] = {}
        for chunk in _chunks(sorted({record for record, _ in wanted})):
            async with self._db.execute(
                    "SELECT subscription_id, record_id, preference_row_id, opted_in, version "
                    "FROM dyn_subscriptions WHERE account = ? AND record_id IN "
                    f"({_marks(len(chunk))})", (account, *chunk)) as cursor:
                for row in await cursor.fetchall():
                    pair = (str(row[1]), str(row[2]))
                    if pair in wanted:
                        found[pair] = SubscriptionRow(
                            subscription_id=str(row[0]), record_id=pair[0],
                            preference_row_id=pair[1], opted_in=bool(row[3]),
                            version=int(row[4]))
        return found

    # --- writes to dotdigital waiting for the first complete read of their preference ------
    async def defer_writes(self, account: str, keys: Iterable[tuple[int, str]]) -> None:
        rows = [(account, preference_id, email) for preference_id, email in keys]
        if rows:
            await self._db.executemany(
                "INSERT INTO deferred_writes (account, preference_id, email) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING", rows)
            await self._db.commit()

    async def deferred_emails(self, account: str, preference_id: int) -> list[str]:
        async with self._db.execute(
                "SELECT email FROM deferred_writes WHERE account = ? AND preference_id = ?",
                (account, preference_id)) as cursor:
            return [str(row[0]) for row in await cursor.fetchall()]

    async def clear_deferred(self, account: str, preference_id: int,
                             emails: Sequence[str]) -> None:
        for chunk in _chunks(list(emails)):
            await self._db.execute(
                "DELETE FROM deferred_writes WHERE account = ? AND preference_id = ? "
                f"AND email IN ({_marks(len(chunk))})", (account, preference_id, *chunk))
        await self._db.commit()
