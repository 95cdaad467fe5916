"""The Dynamics record directory: which record has which email, which records are eligible,
and which subscription row holds which record's preference.

The dynamics-poller keeps it current from change tracking; the reconciler asks it whether an
email is eligible (ever in an email-activated marketing list) and the writer which records and
rows to write. Eligibility is never taken back: a record that leaves the list keeps syncing.
A record newly marked eligible also gets a follow-up, in the same transaction: the work that its
eligibility starts (dotdigital asked about its email, its subscription rows published) is owed
until the poller confirmed it and clears the follow-up, so a run that fails or dies in between
leaves that work to the next run. Also here: dotdigital writes deferred until a complete read
of their preference is reconciled.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from common.store.connection import Transaction as Transaction  # re-exported for the store's parts
from common.vendors.dataverse.schema import RecordType

_CHUNK = 500

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS dyn_records (
        account TEXT NOT NULL,
        record_id TEXT NOT NULL,
        record_type TEXT NOT NULL,
        email TEXT,
        active INTEGER NOT NULL DEFAULT 1,
        eligible INTEGER NOT NULL DEFAULT 0,
        eligible_at TEXT,
        email_since TEXT,
        PRIMARY KEY (account, record_id))""",
    "CREATE INDEX IF NOT EXISTS dyn_records_email ON dyn_records (account, email)",
    """CREATE TABLE IF NOT EXISTS dyn_subscriptions (
        account TEXT NOT NULL,
        subscription_id TEXT NOT NULL,
        record_id TEXT NOT NULL,
        preference_row_id TEXT NOT NULL,
        opted_in INTEGER NOT NULL,
        version INTEGER NOT NULL,
        modified TEXT,
        PRIMARY KEY (account, subscription_id))""",
    """CREATE INDEX IF NOT EXISTS dyn_subscriptions_pair
        ON dyn_subscriptions (account, record_id, preference_row_id)""",
    """CREATE TABLE IF NOT EXISTS dyn_follow_ups (
        account TEXT NOT NULL,
        record_id TEXT NOT NULL,
        PRIMARY KEY (account, record_id))""",
    # email changes seen in the directory whose follow-up (the joined and carried values of the
    # new email) is not confirmed yet: kept across a crash (the directory's cursor has moved on)
    """CREATE TABLE IF NOT EXISTS dyn_email_changes (
        account TEXT NOT NULL,
        record_id TEXT NOT NULL,
        old_email TEXT NOT NULL,
        email TEXT NOT NULL,
        changed_at TEXT NOT NULL,
        PRIMARY KEY (account, record_id))""",
    """CREATE TABLE IF NOT EXISTS deferred_writes (
        account TEXT NOT NULL,
        preference_id INTEGER NOT NULL,
        email TEXT NOT NULL,
        PRIMARY KEY (account, preference_id, email))""",
)


@dataclass(frozen=True, kw_only=True, slots=True)
class RecordRef:
    record_type: RecordType
    record_id: str
    email: str | None
    active: bool = True
    eligible: bool = False
    eligible_at: str | None = None  # ISO time this record became eligible
    # the record's modifiedon when its email last changed to another (None: never seen to):
    # older rows are not changes of this email (common.domain.records); on upsert, the
    # record's modifiedon, kept only when the email changes
    email_since: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class EmailChange:
    """An eligible record whose email changed from ``old`` to ``new`` at ``at`` (its
    modifiedon, as Dataverse wrote it)."""

    record_id: str
    old: str
    new: str
    at: str


@dataclass(frozen=True, kw_only=True, slots=True)
class SubscriptionRow:
    subscription_id: str
    record_id: str
    preference_row_id: str
    opted_in: bool
    version: int
    modified: str | None = None  # the row's modifiedon, as Dataverse wrote it


def records_by_email(rows: Iterable[Sequence[Any]]) -> dict[str, list[RecordRef]]:
    """Eligible records per email, in record id order, from rows of (record_id, record_type,
    email, active, eligible_at, email_since)."""
    found: dict[str, list[RecordRef]] = {}
    for r in sorted(rows, key=lambda row: str(row[0])):
        found.setdefault(r[2], []).append(RecordRef(
            record_id=str(r[0]), record_type=r[1], email=r[2], active=bool(r[3]),
            eligible=True, eligible_at=r[4], email_since=r[5]))
    return found


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start:start + _CHUNK]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _differ(column: str) -> str:
    """SQL for an upsert's ``WHERE`` (SQLite and PostgreSQL alike): the row's ``column``
    (``table.name``) differs from the value proposed for it, NULL against a value included."""
    new = f"excluded.{column.partition('.')[2]}"
    return f"(({column} IS NULL) <> ({new} IS NULL) OR {column} <> {new})"


# An older version of a row never replaces a newer one, and a row already held as it is (the
# writer's own writes, read back; a full read again) is not written again. Parameters:
# :func:`subscription_params`.
UPSERT_SUBSCRIPTION = (
    "INSERT INTO dyn_subscriptions (account, subscription_id, record_id, "
    "preference_row_id, opted_in, version, modified) VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (account, subscription_id) DO UPDATE SET "
    "opted_in = excluded.opted_in, version = excluded.version, "
    "modified = excluded.modified "
    "WHERE excluded.version > dyn_subscriptions.version "
    "OR (excluded.version = dyn_subscriptions.version "
    "AND (excluded.opted_in <> dyn_subscriptions.opted_in "
    f"OR {_differ('dyn_subscriptions.modified')}))")


def subscription_params(account: str, rows: Iterable[SubscriptionRow]) -> list[tuple[Any, ...]]:
    """Rows of :data:`UPSERT_SUBSCRIPTION`."""
    return [(account, r.subscription_id, r.record_id, r.preference_row_id, int(r.opted_in),
             r.version, r.modified) for r in rows]


class SqlTables:
    """Some of the ledger's tables, on its connection. Each call runs in a transaction taken
    from the store, so it never interleaves with the store's own."""

    def __init__(self, transaction: Transaction, *, reading: Transaction | None = None) -> None:
        self._transaction = transaction
        # a plain query may run in a read-only transaction (SQLite: one that takes no lock)
        self._reading = reading or transaction

    async def _rows(self, sql: str, params: Sequence[Any]) -> list[Any]:
        read_only = sql.lstrip()[:6].upper() == "SELECT"
        async with (self._reading if read_only else self._transaction)() as db, \
                db.execute(sql, params) as cursor:
            return list(await cursor.fetchall())

    async def _many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            async with self._transaction() as db:
                await db.executemany(sql, rows)

    async def _in(self, sql: str, head: Sequence[Any], values: Sequence[Any]) -> list[Any]:
        """``sql`` ends with ``IN ({})``; run it over ``values`` in chunks."""
        rows: list[Any] = []
        for chunk in _chunks(values):
            rows += await self._rows(sql.format(_marks(len(chunk))), (*head, *chunk))
        return rows


# An account's eligible records with one of the emails given (``{}``: their placeholders).
_ELIGIBLE_WITH_EMAILS = "FROM dyn_records WHERE account = ? AND eligible = 1 AND email IN ({})"


class SqliteDirectory(SqlTables):
    """The directory's tables."""

    # --- records ---------------------------------------------------------------------------
    async def upsert_records(self, account: str, records: Sequence[RecordRef]) -> None:
        """Insert or update records; a record whose type, email and activity are unchanged is
        left as it is (most changes of a record are to other columns: its row is not written
        again for them)."""
        await self._many(
            "INSERT INTO dyn_records (account, record_id, record_type, email, active) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (account, record_id) DO UPDATE SET "
            "record_type = excluded.record_type, email = excluded.email, "
            "active = excluded.active, email_since = CASE WHEN dyn_records.email IS NOT NULL "
            "AND excluded.email IS NOT NULL AND dyn_records.email <> excluded.email "
            "THEN ? ELSE dyn_records.email_since END "
            "WHERE dyn_records.record_type <> excluded.record_type "
            f"OR dyn_records.active <> excluded.active OR {_differ('dyn_records.email')}",
            [(account, r.record_id, r.record_type, r.email, int(r.active), r.email_since)
             for r in records])

    async def forget_records(self, account: str, record_ids: Sequence[str]) -> None:
        await self._in("DELETE FROM dyn_records WHERE account = ? AND record_id IN ({})",
                       (account,), list(record_ids))

    async def mark_eligible(self, account: str, record_ids: Iterable[str]) -> set[str]:
        """Mark records eligible for good; returns the ones that were not eligible before.

        Each of those gets a follow-up in the same transaction (see :meth:`follow_ups`)."""
        unique = sorted(set(record_ids))
        already = {str(r[0]) for r in await self._in(
            "SELECT record_id FROM dyn_records WHERE account = ? AND eligible = 1 "
            "AND record_id IN ({})", (account,), unique)}
        newly = [r for r in unique if r not in already]
        if not newly:
            return set()
        now = datetime.now(UTC).isoformat()
        async with self._transaction() as db:
            # A member not yet in the directory stays a placeholder until its row is read.
            await db.executemany(
                "INSERT INTO dyn_records (account, record_id, record_type, email, active, "
                "eligible, eligible_at) VALUES (?, ?, 'contact', NULL, 1, 1, ?) "
                "ON CONFLICT (account, record_id) DO UPDATE SET eligible = 1, "
                "eligible_at = excluded.eligible_at", [(account, r, now) for r in newly])
            await db.executemany(
                "INSERT INTO dyn_follow_ups (account, record_id) VALUES (?, ?) "
                "ON CONFLICT DO NOTHING", [(account, r) for r in newly])
        return set(newly)

    async def follow_ups(self, account: str) -> set[str]:
        """Records marked eligible whose follow-up work is not confirmed yet (a run failed or
        died after marking them)."""
        rows = await self._rows("SELECT record_id FROM dyn_follow_ups WHERE account = ?",
                                (account,))
        return {str(r[0]) for r in rows}

    async def clear_follow_ups(self, account: str, record_ids: Iterable[str]) -> None:
        """The follow-up work of these records is confirmed (a first run clears every record:
        a transaction per few thousand keeps memory flat)."""
        unique = sorted(set(record_ids))
        for start in range(0, len(unique), _CHUNK * 10):
            await self._many("DELETE FROM dyn_follow_ups WHERE account = ? AND record_id = ?",
                             [(account, r) for r in unique[start:start + _CHUNK * 10]])

    async def note_email_changes(self, account: str, changes: Sequence[EmailChange]) -> None:
        """Remember email changes until :meth:`clear_email_changes` (a record changed twice
        before it was followed keeps its first old email)."""
        await self._many(
            "INSERT INTO dyn_email_changes (account, record_id, old_email, email, changed_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (account, record_id) DO UPDATE SET "
            "email = excluded.email, changed_at = excluded.changed_at",
            [(account, c.record_id, c.old, c.new, c.at) for c in changes])

    async def email_changes(self, account: str) -> list[EmailChange]:
        rows = await self._rows("SELECT record_id, old_email, email, changed_at "
                                "FROM dyn_email_changes WHERE account = ? ORDER BY record_id",
                                (account,))
        return [EmailChange(record_id=str(r[0]), old=r[1], new=r[2], at=r[3]) for r in rows]

    async def clear_email_changes(self, account: str, changes: Sequence[EmailChange]) -> None:
        """The follow-up of these changes is confirmed (a newer change of a record, noted
        since, stays)."""
        await self._many("DELETE FROM dyn_email_changes WHERE account = ? AND record_id = ? "
                         "AND email = ? AND changed_at = ?",
                         [(account, c.record_id, c.new, c.at) for c in changes])

    async def records(self, account: str, record_ids: Sequence[str]) -> dict[str, RecordRef]:
        rows = await self._in(
            "SELECT record_id, record_type, email, active, eligible, eligible_at, email_since "
            "FROM dyn_records WHERE account = ? AND record_id IN ({})",
            (account,), sorted(set(record_ids)))
        return {str(r[0]): RecordRef(record_id=str(r[0]), record_type=r[1], email=r[2],
                                     active=bool(r[3]), eligible=bool(r[4]), eligible_at=r[5],
                                     email_since=r[6])
                for r in rows}

    async def emails_of_records(self, account: str, record_ids: Sequence[str]) -> set[str]:
        return {r.email for r in (await self.records(account, record_ids)).values()
                if r.email is not None}

    async def records_for_emails(self, account: str,
                                 emails: Iterable[str]) -> dict[str, list[RecordRef]]:
        """Eligible records per email (several records may share one email)."""
        return records_by_email(await self._in(
            "SELECT record_id, record_type, email, active, eligible_at, email_since "
            + _ELIGIBLE_WITH_EMAILS, (account,), sorted(set(emails))))

    async def eligible_emails(self, account: str, emails: Iterable[str]) -> set[str]:
        """The emails of :meth:`records_for_emails`, without building its records (the
        reconciler asks this for every dotdigital change of a batch)."""
        rows = await self._in("SELECT email " + _ELIGIBLE_WITH_EMAILS, (account,),
                              sorted(set(emails)))
        return {row[0] for row in rows}

    # --- subscription rows -----------------------------------------------------------------
    async def upsert_subscriptions(self, account: str, rows: Sequence[SubscriptionRow]) -> None:
        """Insert or update subscription rows (:data:`UPSERT_SUBSCRIPTION`)."""
        await self._many(UPSERT_SUBSCRIPTION, subscription_params(account, rows))

    async def forget_subscriptions(self, account: str, subscription_ids: Sequence[str]) -> None:
        await self._in("DELETE FROM dyn_subscriptions WHERE account = ? "
                       "AND subscription_id IN ({})", (account,), list(subscription_ids))

    async def subscriptions_for(
            self, account: str, pairs: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], SubscriptionRow]:
        """Known subscription rows by (record id, preference row id)."""
        wanted = set(pairs)
        rows = await self._in(
            "SELECT subscription_id, record_id, preference_row_id, opted_in, version, modified "
            "FROM dyn_subscriptions WHERE account = ? AND record_id IN ({})", (account,),
            sorted({record for record, _ in wanted}))
        found: dict[tuple[str, str], SubscriptionRow] = {}
        for r in rows:
            pair = (str(r[1]), str(r[2]))
            if pair in wanted:
                found[pair] = SubscriptionRow(subscription_id=str(r[0]), record_id=pair[0],
                                              preference_row_id=pair[1], opted_in=bool(r[3]),
                                              version=int(r[4]), modified=r[5])
        return found

    # --- dotdigital writes waiting for a complete read of their preference -----------------
    async def defer_writes(self, account: str, keys: Iterable[tuple[int, str]]) -> None:
        await self._many("INSERT INTO deferred_writes (account, preference_id, email) "
                         "VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                         [(account, preference_id, email) for preference_id, email in keys])

    async def deferred_emails(self, account: str, preference_id: int) -> list[str]:
        rows = await self._rows("SELECT email FROM deferred_writes WHERE account = ? "
                                "AND preference_id = ?", (account, preference_id))
        return [str(r[0]) for r in rows]

    async def clear_deferred(self, account: str, preference_id: int,
                             emails: Sequence[str]) -> None:
        await self._in("DELETE FROM deferred_writes WHERE account = ? AND preference_id = ? "
                       "AND email IN ({})", (account, preference_id), list(emails))
