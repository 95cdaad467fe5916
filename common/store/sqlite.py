"""SQLite ledger store: one connection in WAL mode, in a thread of its own
(:mod:`common.store.sqlite_thread`), one transaction per call.

The SQL sticks to what PostgreSQL also accepts (row values, ``ON CONFLICT ... DO UPDATE``,
integer microsecond timestamps) so the PostgreSQL store can share its shape. Every query is
scoped by account.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from collections import defaultdict
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self, TypeVar, cast

from common.domain import (
    ContactState,
    HistoryEntry,
    KeyState,
    Observation,
    PreferenceKey,
    normalize_email,
)
from common.domain.rows import (
    DECISIONS,
    HistoryRow,
    KeyTuple,
    ObservationRow,
    StateRow,
    key_of,
    key_state,
    key_tuple,
    state_row,
)
from common.domain.sides import SIDES
from common.store.batch_reads import BatchReads, BatchSnapshot, Part, Query
from common.store.batch_reads import queries as batch_queries
from common.store.batch_reads import snapshot as batch_snapshot
from common.store.codec import decode_rows, encode_row, from_us, to_us
from common.store.connection import Connection
from common.store.coordination import SCHEMA as COORDINATION_SCHEMA
from common.store.coordination import SqlCoordination
from common.store.directory import SCHEMA as DIRECTORY_SCHEMA
from common.store.directory import (
    UPSERT_SUBSCRIPTION,
    EmailChange,
    RecordRef,
    SqliteDirectory,
    SubscriptionRow,
    subscription_params,
)
from common.store.history import BY_EMAIL as HISTORY_BY_EMAIL
from common.store.history import INDEXES as HISTORY_INDEXES
from common.store.history import fill_buckets, history_bucket
from common.store.interface import (
    Change,
    ConflictError,
    RowChange,
    RowStates,
    StoreUnavailable,
)
from common.store.outstanding import SCHEMA as OUTSTANDING_SCHEMA
from common.store.outstanding import (
    DueKey,
    OutstandingStats,
    SqlOutstanding,
    index_rows,
    index_statements,
    upgrade,
)
from common.store.parking import SCHEMA as PARKING_SCHEMA
from common.store.parking import SqliteParking
from common.store.personal import SCHEMA as PERSONAL_SCHEMA
from common.store.personal import SqlPersonalData
from common.store.sqlite_thread import SqliteConnection, transact
from common.store.write_batches import DELETE as DELETE_WRITE_BATCH
from common.store.write_batches import INSERT as INSERT_WRITE_BATCH
from common.store.write_batches import SCHEMA as WRITE_BATCH_SCHEMA
from common.store.write_batches import WriteBatch, list_query, with_writes_in_flight
from common.vendors.budget import BudgetGrant

log = logging.getLogger("prefsync.store")

# 2: key states are written in format 2 (common.store.codec), which code of schema 1 cannot
# read; that code refuses to open the ledger, rather than fail on each state it loads.
# 3: history rows carry their email's bucket (common.store.history), which code of schema 2
# does not write: its rows could not be found by email.
# 4: writes in flight are write batches (common.store.write_batches), which code of schema 3
# does not read: it would take the echo of such a write for a change made by a person.
SCHEMA_VERSION = 4
# Ledger schemas this code brings up to SCHEMA_VERSION when it opens them (their format-1
# states are still read, and written in format 2 by their next save); those before schema 3
# have their history rows given buckets once.
UPGRADED_SCHEMAS = ("1", "2", "3")
_BUCKETLESS_SCHEMAS = ("1", "2")

T = TypeVar("T")


async def settle_schema(db: Connection) -> None:
    """Inside the schema transaction, once the tables exist (either database): a new ledger is
    stamped with this code's schema version, what an older ledger lacks is built, and a ledger
    of another version is refused."""
    async with db.execute("SELECT value FROM meta WHERE name = 'schema'") as cursor:
        before = await cursor.fetchone()
    if before is None or before[0] in _BUCKETLESS_SCHEMAS:
        # a ledger older than buckets (with no schema row at all, the very first ones); a new
        # ledger's history is empty
        filled = await fill_buckets(db)
        if filled:
            log.info("ledger history given buckets", extra={"rows": filled})
    await db.execute("INSERT INTO meta (name, value) VALUES ('schema', ?) "
                     "ON CONFLICT (name) DO NOTHING", (str(SCHEMA_VERSION),))
    await db.execute(f"UPDATE meta SET value = ? WHERE name = 'schema' AND value IN "
                     f"({', '.join('?' for _ in UPGRADED_SCHEMAS)})",
                     (str(SCHEMA_VERSION), *UPGRADED_SCHEMAS))
    await upgrade(db)
    async with db.execute("SELECT value FROM meta WHERE name = 'schema'") as cursor:
        row = await cursor.fetchone()
    found = row[0] if row else None
    if found is None or int(found) != SCHEMA_VERSION:
        raise RuntimeError(f"ledger schema {'?' if found is None else found} is not the "
                           f"supported {SCHEMA_VERSION}")


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS key_state (
        account TEXT NOT NULL, email TEXT NOT NULL, preference_id INTEGER NOT NULL,
        revision INTEGER NOT NULL, state BLOB NOT NULL,
        PRIMARY KEY (account, email, preference_id))""",
    """CREATE TABLE IF NOT EXISTS history (
        id INTEGER PRIMARY KEY, account TEXT NOT NULL, email TEXT NOT NULL,
        preference_id INTEGER NOT NULL, side TEXT NOT NULL, opted_in INTEGER NOT NULL,
        origin_time INTEGER NOT NULL, change_id TEXT NOT NULL, decision TEXT NOT NULL,
        recorded_at INTEGER NOT NULL, corrected_time INTEGER, bucket INTEGER)""",
    """CREATE TABLE IF NOT EXISTS contact_state (
        account TEXT NOT NULL, email TEXT NOT NULL, status TEXT NOT NULL,
        suppressed INTEGER NOT NULL, since INTEGER NOT NULL, revision INTEGER NOT NULL,
        PRIMARY KEY (account, email))""",
    """CREATE TABLE IF NOT EXISTS checkpoint (
        account TEXT NOT NULL, source TEXT NOT NULL, value TEXT NOT NULL,
        updated_at INTEGER NOT NULL, PRIMARY KEY (account, source))""",
)

# Every table of the ledger (the PostgreSQL store creates the same ones).
SCHEMA_STATEMENTS = (*_SCHEMA, *DIRECTORY_SCHEMA, *PARKING_SCHEMA, *COORDINATION_SCHEMA,
                     *PERSONAL_SCHEMA, *OUTSTANDING_SCHEMA, *WRITE_BATCH_SCHEMA)

# Columns added to tables of the first schema since: (table, column, type). A ledger made
# before gets them when opened (nullable, so its rows stay as they were).
ADDED_COLUMNS = (("history", "corrected_time", "INTEGER"),
                 ("dyn_records", "email_since", "TEXT"),
                 ("outstanding_keys", "sides", "INTEGER NOT NULL DEFAULT 3"),
                 ("history", "bucket", "INTEGER"),
                 ("parked_observations", "carried", "INTEGER NOT NULL DEFAULT 0"),
                 ("parked_observations", "joined", "INTEGER NOT NULL DEFAULT 0"),
                 ("parked_observations", "offset_us", "INTEGER"),
                 ("parked_observations", "uncertainty_us", "INTEGER"),
                 ("parked_observations", "bounded_us", "INTEGER"),
                 ("parked_observations", "clock_epoch", "INTEGER"))

# What is made once every added column exists (either database).
AFTER_COLUMNS = HISTORY_INDEXES

# SQLite's page cache stays at its default (2 MB per connection). In WAL mode a connection drops
# its whole cache whenever another connection committed since its last transaction, which the
# services sharing the ledger do all the time; 16 MiB measured no CPU gained per key state
# (bench.ledger_cost, and 16,000 keys read and written over again in a 70 MB ledger) and cost
# its size in resident memory, which each service must keep under 150 MB. A service whose own
# transactions touch more than that may ask for more (``cache_mib``; see
# services.runtime.registry.LEDGER_CACHE_MIB).

# The WAL's size, in pages, past which a commit copies it back into the ledger file (SQLite's
# default is 1,000: 4 MB). A round's keys are spread over the whole ledger, so a save dirties
# about a page per key, and at the default nearly every big save was followed by a checkpoint
# that copied each page and synced the file. Copied back less often, a page several saves
# wrote is copied once. At 10,000 pages (40 MB of WAL at most between checkpoints), saves of
# 300 random keys of a steady account's 100,000 by three stores in turn measured 1.0-1.6 µs
# less CPU and 3.7-4.4 µs less time per key saved (of 15-16 and 21-22), loads 0.4-0.6 µs more
# CPU per key (of 6-7): ``python -m bench.wal_cost``.
WAL_CHECKPOINT_PAGES = 10_000

# Keys per row-value IN query: 3 parameters each, well under SQLite's parameter limit.
_CHUNK = 300

# Compare-and-set in the write itself: a key expected at a revision is updated only while it
# is still there at that revision; a key expected new is inserted only while it is not stored.
# Keys the two statements left alone (fewer rows changed than keys) moved: a conflict.
_UPDATE_STATE = """
    UPDATE key_state SET revision = ?, state = ?
    WHERE account = ? AND email = ? AND preference_id = ? AND revision = ?"""

_INSERT_STATE = """
    INSERT INTO key_state (account, email, preference_id, revision, state)
    VALUES (?, ?, ?, ?, ?)
    ON CONFLICT (account, email, preference_id) DO NOTHING"""

_INSERT_HISTORY = """
    INSERT INTO history (account, email, preference_id, side, opted_in, origin_time, change_id,
                         decision, recorded_at, corrected_time, bucket)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""

_UPSERT_CONTACT = """
    INSERT INTO contact_state (account, email, status, suppressed, since, revision)
    VALUES (?, ?, ?, ?, ?, 1)
    ON CONFLICT (account, email) DO UPDATE SET
        status = excluded.status, suppressed = excluded.suppressed, since = excluded.since,
        revision = contact_state.revision + 1
    WHERE excluded.since > contact_state.since
       OR (excluded.since = contact_state.since
           AND excluded.suppressed > contact_state.suppressed)"""


def _as_stored(observation: Observation) -> Observation:
    return observation


def _keyed(columns: str, keys: Sequence[KeyTuple]) -> tuple[str, list[Any]]:
    """A query for ``columns`` of ``key_state`` rows of ``keys``: a join against a VALUES list,
    which both SQLite and PostgreSQL answer through the primary-key index."""
    # typed, so that PostgreSQL compares the ids as numbers
    placeholders = ",".join("(?, ?, CAST(? AS BIGINT))" for _ in keys)
    params: list[Any] = []
    for k in keys:
        params.extend(k)
    sql = (f"WITH wanted (account, email, preference_id) AS (VALUES {placeholders}) "
           f"SELECT {columns} FROM wanted w JOIN key_state k ON k.account = w.account "
           "AND k.email = w.email AND k.preference_id = w.preference_id")
    return sql, params


def _revision_queries(keys: Sequence[KeyTuple]) -> list[tuple[str, list[Any]]]:
    return [_keyed("k.account, k.email, k.preference_id, k.revision", keys[i:i + _CHUNK])
            for i in range(0, len(keys), _CHUNK)]


def state_queries(keys: Sequence[KeyTuple]) -> list[tuple[str, list[Any]]]:
    return [_keyed("k.account, k.email, k.preference_id, k.revision, k.state",
                   keys[i:i + _CHUNK])
            for i in range(0, len(keys), _CHUNK)]


def history_rows(rows: Iterable[HistoryRow[KeyTuple]], *,
                 recorded_at: datetime) -> list[tuple[Any, ...]]:
    """Rows of :data:`_INSERT_HISTORY` for the kernel's history rows of one batch."""
    recorded = to_us(recorded_at)
    return [(account, email, preference_id, SIDES[side], int(opted_in), origin, change_id,
             DECISIONS[decision], recorded, corrected, history_bucket(email))
            for (account, email, preference_id), side, opted_in, origin, change_id, decision,
            corrected in rows]


@dataclass(frozen=True, kw_only=True, slots=True)
class SaveBatch:
    """What a save writes, built before its transaction (none of it needs the database)."""

    changes: Sequence[RowChange]
    revisions: list[int]  # the new revision of each change, in order
    state_rows: list[tuple[Any, ...]]
    history_rows: list[tuple[Any, ...]]
    index: list[tuple[str, Sequence[tuple[Any, ...]]]]  # the outstanding index's statements
    contact_rows: list[tuple[Any, ...]] = field(default_factory=list)  # of _UPSERT_CONTACT
    # of the directory's UPSERT_SUBSCRIPTION
    subscription_rows: list[tuple[Any, ...]] = field(default_factory=list)
    # write batches whose outcome this save records: (account, id), deleted with it
    ended_batches: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def of(cls, changes: Sequence[Change], *, history: Sequence[HistoryEntry],
           now_us: int) -> SaveBatch:
        """A save of key states (the dataclasses) and history entries."""
        rows: list[tuple[Any, ...]] = [_history_row(h) for h in history]
        row_changes: list[RowChange] = []
        for expected, state, entry in changes:
            k = state.key
            row_changes.append((expected, (k.account, k.email, k.preference_id),
                                state_row(state)))
            if entry is not None:
                rows.append(_history_row(entry))
        return cls.of_rows(row_changes, history=rows, now_us=now_us)

    @classmethod
    def of_rows(cls, changes: Sequence[RowChange], *, history: list[tuple[Any, ...]],
                now_us: int) -> SaveBatch:
        """A save of state rows, with rows of :data:`_INSERT_HISTORY`, and the index of
        outstanding keys kept."""
        if len({key for _, key, _ in changes}) != len(changes):
            raise ValueError("a save may hold each key only once")
        state_rows: list[tuple[Any, ...]] = []
        revisions: list[int] = []
        for expected, key, row in changes:
            revision = (expected or 0) + 1
            state_rows.append((*key, revision, encode_row(row)))
            revisions.append(revision)
        # written in key order: each page of the primary key is then visited once, its keys
        # one after another (the keys are unique, so only they are compared)
        state_rows.sort()
        # the index of keys with outstanding writes, kept in the same transaction
        index = index_statements(*index_rows(
            ((key, row, revision) for (_, key, row), revision in zip(changes, revisions,
                                                                    strict=True)),
            now_us=now_us))
        return cls(changes=changes, revisions=revisions, state_rows=state_rows,
                   history_rows=history, index=index)

    @property
    def keys(self) -> list[KeyTuple]:
        return [key for _, key, _ in self.changes]

    def revision_queries(self) -> list[tuple[str, list[Any]]]:
        """The queries of the stored revisions of this save's keys, for :meth:`moved`."""
        return _revision_queries(self.keys)

    def moved(self, stored: Iterable[tuple[str, str, int, int]]) -> list[PreferenceKey]:
        """The keys whose ``stored`` revisions (rows of :meth:`revision_queries`, read after the
        save rolled back) are not the ones the changes expect; all of them when none are (the
        save met a conflict that is over)."""
        revisions = {(account, email, preference_id): revision
                     for account, email, preference_id, revision in stored}
        return ([key_of(key) for expected, key, _ in self.changes
                 if revisions.get(key) != (expected or None)]
                or list(map(key_of, self.keys)))

    def updates(self) -> list[tuple[Any, ...]]:
        """Rows of :data:`_UPDATE_STATE`: the changes of keys expected stored."""
        return [(revision, state, account, email, preference_id, revision - 1)
                for account, email, preference_id, revision, state in self.state_rows
                if revision > 1]

    def inserts(self) -> list[tuple[Any, ...]]:
        """Rows of :data:`_INSERT_STATE`: the changes of keys expected new."""
        return [row for row in self.state_rows if row[3] == 1]

    def statements(self, *, in_lock_order: bool = False
                   ) -> list[tuple[str, Sequence[tuple[Any, ...]]]]:
        """What the save runs once its states are written: (statement, rows) for
        ``executemany``; with ``in_lock_order``, contacts and subscription rows in key order (a
        row's own rows keep theirs), so two saves with rows in common lock them in one order
        and never deadlock (PostgreSQL; a SQLite save holds the whole database)."""
        contacts, subscriptions = self.contact_rows, self.subscription_rows
        if in_lock_order:
            contacts = sorted(contacts, key=_row_key)
            subscriptions = sorted(subscriptions, key=_row_key)
        return [*([(_INSERT_HISTORY, self.history_rows)] if self.history_rows else []),
                *self.index,
                *([(_UPSERT_CONTACT, contacts)] if contacts else []),
                *([(UPSERT_SUBSCRIPTION, subscriptions)] if subscriptions else []),
                *([(DELETE_WRITE_BATCH, self.ended_batches)] if self.ended_batches else [])]

    def write(self, connection: sqlite3.Connection) -> None:
        """In SQLite's thread, inside the save's ``BEGIN IMMEDIATE`` transaction (which no
        other writer can enter while it runs)."""
        connection.execute("SAVEPOINT states")
        written = sum(connection.executemany(sql, rows).rowcount
                      for sql, rows in ((_UPDATE_STATE, self.updates()),
                                        (_INSERT_STATE, self.inserts())) if rows)
        if written != len(self.changes):
            # name the keys that moved from the revisions as they were before this save
            connection.execute("ROLLBACK TO states")
            raise ConflictError(self.moved(row for sql, params in self.revision_queries()
                                           for row in connection.execute(sql, params)))
        for sql, rows in self.statements():
            connection.executemany(sql, rows)


def _plan_rows(connection: sqlite3.Connection,
               plan: Sequence[Query]) -> list[tuple[Part, list[Any]]]:
    """Each query's part and rows, in the connection's thread (within whatever transaction is
    open)."""
    return [(part, connection.execute(sql, params).fetchall()) for part, sql, params in plan]


class _RowStates:
    """:class:`~common.store.interface.RowStates` over ``_answer`` (queries read from one
    snapshot) and ``_write`` (a save): a store's own, or those of a transaction that holds its
    key states."""

    async def _answer(self, plan: Sequence[Query]) -> list[tuple[Part, list[Any]]]:
        raise NotImplementedError

    async def _write(self, batch: SaveBatch) -> list[int]:
        raise NotImplementedError

    async def _fetch_states(self, keys: Sequence[KeyTuple]) -> dict[KeyTuple, StateRow]:
        """The states of ``keys`` with their writes in flight (common.store.write_batches,
        rule 2), from one snapshot."""
        if not keys:
            return {}
        plan: list[Query] = [("states", sql, params) for sql, params in state_queries(keys)]
        plan.append(("write_batches", *list_query(k[0] for k in keys)))
        state_rows: list[Any] = []
        batch_rows: list[Any] = []
        for part, rows in await self._answer(plan):
            (batch_rows if part == "write_batches" else state_rows).extend(rows)
        states = decode_rows(state_rows)
        with_writes_in_flight(states, keys, batch_rows)
        return states

    async def load_rows(self, keys: Iterable[KeyTuple]) -> dict[KeyTuple, StateRow]:
        return await self._fetch_states(list(dict.fromkeys(keys)))

    async def save_rows(self, changes: Sequence[RowChange], *,
                        history: Sequence[HistoryRow[KeyTuple]] = (),
                        recorded_at: datetime | None = None,
                        entries: Sequence[HistoryEntry] = (),
                        contacts: Sequence[ContactState] = (),
                        subscriptions: Sequence[tuple[str, SubscriptionRow]] = (),
                        ended_batches: Sequence[tuple[str, str]] = ()) -> list[int]:
        rows = [*history_rows(history, recorded_at=recorded_at or datetime.now(UTC)),
                *map(_history_row, entries)]
        batch = SaveBatch.of_rows(changes, history=rows, now_us=now_us())
        batch.contact_rows.extend(map(_contact_row, contacts))
        for account, row in subscriptions:
            batch.subscription_rows.extend(subscription_params(account, [row]))
        batch.ended_batches.extend(ended_batches)
        return await self._write(batch)


class _HeldSqlite(_RowStates):
    """Key states loaded and saved in the store's open ``BEGIN IMMEDIATE`` transaction (its
    connection's lock is held: each step is a job of the connection's thread)."""

    def __init__(self, db: SqliteConnection) -> None:
        self._db = db

    async def _answer(self, plan: Sequence[Query]) -> list[tuple[Part, list[Any]]]:
        return await self._db.run(lambda c: _plan_rows(c, plan))

    async def _write(self, batch: SaveBatch) -> list[int]:
        await self._db.run(batch.write)
        return batch.revisions


async def _select_in(db: Connection, sql: str, account: str,
                     values: Sequence[str]) -> list[Any]:
    """Rows of ``sql`` (ending in a column name) ``IN`` ``values``, asked in chunks."""
    rows: list[Any] = []
    for i in range(0, len(values), _CHUNK):
        chunk = values[i:i + _CHUNK]
        placeholders = ",".join("?" for _ in chunk)
        async with db.execute(f"{sql} IN ({placeholders})", [account, *chunk]) as cur:
            rows.extend(await cur.fetchall())
    return rows


def _history_row(h: HistoryEntry) -> tuple[Any, ...]:
    return (h.account, h.email, h.preference_id, h.side, int(h.opted_in),
            to_us(h.origin_time), h.change_id, h.decision, to_us(h.recorded_at),
            None if h.corrected_time is None else to_us(h.corrected_time),
            history_bucket(h.email))


def _row_key(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A contact's or a subscription row's key: (account, email) or (account, its id)."""
    return row[:2]


def _contact_row(c: ContactState) -> tuple[Any, ...]:
    """A row of :data:`_UPSERT_CONTACT`."""
    return c.account, c.email, c.status, int(c.suppressed), to_us(c.since)


async def _run(db: SqliteConnection, sql: str) -> None:
    await db.execute(sql)


def now_us() -> int:
    return to_us(datetime.now(UTC))


async def _use_wal(db: SqliteConnection, *, wait_s: float = 60.0) -> None:
    """Switch the file to WAL (it stays so). Only the first opener of a new file switches;
    the switch needs the file to itself, and SQLite answers "locked" at once, without its busy
    wait, when another process is opening the same file just then: so retry for a while."""
    deadline = time.monotonic() + wait_s
    delay = 0.01
    while True:
        try:
            async with db.execute("PRAGMA journal_mode") as cur:
                row = await cur.fetchone()
            if row is not None and str(row[0]).lower() == "wal":
                return
            await db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
        await asyncio.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.5)


class SqliteLedgerStore(_RowStates):
    """The ledger in one SQLite file (or in memory for ``:memory:``)."""

    def __init__(self, *, path: str, busy_timeout_s: float = 60.0,
                 cache_mib: int | None = None,
                 wal_checkpoint_pages: int = WAL_CHECKPOINT_PAGES) -> None:
        self._path = path
        self._wal_checkpoint_pages = int(wal_checkpoint_pages)
        # the connection's page cache (None: SQLite's default; see the note above the schema)
        self._cache_mib = cache_mib
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._db: SqliteConnection | None = None
        # one connection: transactions must not interleave on it
        self._lock = asyncio.Lock()
        # roll-backs of interrupted transactions still under way (they hold the lock)
        self._ending: set[asyncio.Task[None]] = set()
        self._directory = SqliteDirectory(self._transaction, reading=self._reading)
        self._parking = SqliteParking(self._transaction, reading=self._reading)
        self._coordination = SqlCoordination(self._transaction)
        self._personal = SqlPersonalData(self._transaction, reading=self._reading)
        self._outstanding = SqlOutstanding(self._transaction, reading=self._reading)

    def __repr__(self) -> str:
        return f"SqliteLedgerStore(path={self._path!r})"

    # -- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        if self._db is not None:
            return
        db = await SqliteConnection.connect(self._path)
        try:
            # Several services (processes) share the file; one may hold the write lock for
            # a few seconds (a big batch on a loaded machine): wait rather than fail.
            await db.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            await _use_wal(db)
            # FULL: a committed decision survives power loss (messages are acked after commit)
            await db.execute("PRAGMA synchronous = FULL")
            await db.execute(f"PRAGMA wal_autocheckpoint = {self._wal_checkpoint_pages}")
            if self._cache_mib is not None:
                await db.execute(f"PRAGMA cache_size = {-1024 * int(self._cache_mib)}")
            await db.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA_STATEMENTS:
                await db.execute(statement)
            for table, column, kind in ADDED_COLUMNS:
                async with db.execute(f"PRAGMA table_info({table})") as cur:
                    if column not in {row[1] for row in await cur.fetchall()}:
                        await db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            for statement in AFTER_COLUMNS:
                await db.execute(statement)
            await settle_schema(db)
            await db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            await db.close()
            # another process held the write lock past the busy timeout
            raise StoreUnavailable(f"cannot open the ledger at {self._path}: {exc}",
                                   transient="locked" in str(exc)) from None
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Connection]:
        async with self._begun("BEGIN IMMEDIATE") as db:
            yield db

    @asynccontextmanager
    async def _begun(self, begin: str) -> AsyncIterator[Connection]:
        """One transaction on the connection; whatever ends it (an error, a cancellation at
        any point), the connection is left outside any transaction before anyone else uses it.

        1. The ``BEGIN`` runs as a task of its own: cancelled while it waits for another
           process's write lock, the caller returns at once, and the ``BEGIN`` (which still
           runs on the connection's thread) is rolled back as soon as it ends.
        2. The lock on the connection is released only once the connection is clean, so the
           next call never finds a transaction open ("cannot start a transaction within a
           transaction") and other processes never wait on a transaction nobody ends.
        """
        if self._db is None:
            raise RuntimeError("the ledger store is not open")
        db = self._db
        await self._lock.acquire()
        began: asyncio.Future[Any] = asyncio.ensure_future(_run(db, begin))
        try:
            await asyncio.shield(began)
        except BaseException:
            self._end_later(db, began)
            raise
        try:
            yield db
            await db.execute("COMMIT")
        except BaseException as exc:
            ending = self._end_later(db, None)
            if not isinstance(exc, asyncio.CancelledError):
                # callers that go on at once (a conflict retried) find the connection clean
                await asyncio.shield(ending)
            raise
        self._lock.release()

    def _end_later(self, db: SqliteConnection,
                   began: asyncio.Future[Any] | None) -> asyncio.Task[None]:
        task = asyncio.ensure_future(self._end(db, began))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)
        return task

    async def _end(self, db: SqliteConnection, began: asyncio.Future[Any] | None) -> None:
        """Roll back whatever is open (once ``began`` has ended), then free the connection."""
        try:
            if began is not None:
                with contextlib.suppress(Exception):
                    await began
            await db.execute("ROLLBACK")
        except sqlite3.OperationalError:
            pass  # nothing open: the BEGIN failed, or the COMMIT went through
        except Exception as error:  # the connection closed meanwhile: SQLite rolled back
            log.debug("rollback after an interrupted transaction: %s", error)
        finally:
            self._lock.release()

    def _reading(self) -> AbstractAsyncContextManager[Connection]:
        """A transaction for queries only: a deferred one, which in WAL mode takes no lock, so
        it neither waits for another process's write nor holds one up."""
        return self._begun("BEGIN")

    # -- key states -----------------------------------------------------------------------
    # Loading and saving a batch each run as one job in the connection's thread
    # (common.store.sqlite_thread, rule 2): one trip to the thread per call, not per statement.
    async def _in_one_job(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """``job``, a whole transaction that ends itself (:func:`transact`), in the
        connection's thread; the connection is taken as by any transaction (:meth:`_begun`).

        Cancelled, the caller returns at once; the job still runs to its end, which leaves the
        connection outside any transaction, and only then frees it for the next caller."""
        if self._db is None:
            raise RuntimeError("the ledger store is not open")
        db = self._db
        await self._lock.acquire()
        try:
            done = db.run(job)
        except BaseException:
            self._lock.release()
            raise
        done.add_done_callback(self._job_ended)
        return await asyncio.shield(done)

    async def _write_statements(self, statements: Sequence[tuple[str, Sequence[Any], bool]]
                                ) -> None:
        """Each of ``statements`` (SQL, its parameters, and whether they are many rows for
        ``executemany``), in order, in one ``BEGIN IMMEDIATE`` transaction run as one job in
        the connection's thread (:meth:`_in_one_job`): SQLite's write lock is held for the
        statements alone, never across a trip through the event loop, which on a busy machine
        is what every other process's save would wait for. Cancelled, the caller returns at
        once and the job still runs to its end: for the short writes the services make often
        whose commit after the caller gave up is as good as one just before it (a checkpoint
        of work done; contact states, monotonic in their own time)."""
        def write(connection: sqlite3.Connection) -> None:
            for sql, parameters, many in statements:
                if many:
                    connection.executemany(sql, parameters)
                else:
                    connection.execute(sql, parameters)

        await self._in_one_job(lambda c: transact(c, "BEGIN IMMEDIATE", write))

    def _job_ended(self, done: asyncio.Future[Any]) -> None:
        if not done.cancelled():
            done.exception()  # its caller may have stopped waiting: nobody else will look
        self._lock.release()

    async def _answer(self, plan: Sequence[Query]) -> list[tuple[Part, list[Any]]]:
        """Each query's part and rows, all read from one snapshot in one job."""
        def fetch(connection: sqlite3.Connection) -> list[tuple[Part, list[Any]]]:
            # a deferred transaction: every query reads the same snapshot, and takes no lock
            return transact(connection, "BEGIN", lambda c: _plan_rows(c, plan))

        return await self._in_one_job(fetch)

    async def read_batch(self, reads: BatchReads) -> BatchSnapshot:
        """A batch's reads from one snapshot (:mod:`common.store.batch_reads`)."""
        plan = batch_queries(reads, state_queries=state_queries(
            list(dict.fromkeys(reads.states_of))))
        return batch_snapshot(reads, await self._answer(plan))

    async def load(self, keys: Iterable[PreferenceKey]) -> dict[PreferenceKey, KeyState]:
        wanted = {key_tuple(k): k for k in keys}
        return {wanted[k]: key_state(wanted[k], row)
                for k, row in (await self._fetch_states(list(wanted))).items()}

    async def begin_writes(self, batch: WriteBatch) -> None:
        """Record a round's writes as in flight (common.store.write_batches, rule 1)."""
        # A transaction of its own, not one job (_write_statements): a round cancelled while
        # it begins leaves no record of writes it will never send (a job, once started, would
        # commit it anyway), which would stand in flight until it expires.
        async with self._transaction() as db:
            await db.execute(INSERT_WRITE_BATCH, batch.row())

    async def _write(self, batch: SaveBatch) -> list[int]:
        def write(connection: sqlite3.Connection) -> None:
            transact(connection, "BEGIN IMMEDIATE", batch.write)

        await self._in_one_job(write)
        return batch.revisions

    async def save(self, changes: Sequence[Change], *,
                   history: Sequence[HistoryEntry] = ()) -> list[int]:
        return await self._write(SaveBatch.of(changes, history=history, now_us=now_us()))

    def holding(self) -> AbstractAsyncContextManager[RowStates] | None:
        """A ``BEGIN IMMEDIATE`` transaction: SQLite's write lock, which every save takes
        anyway, held from the load to the save."""
        return self._held()

    @asynccontextmanager
    async def _held(self) -> AsyncIterator[RowStates]:
        async with self._transaction() as db:
            yield _HeldSqlite(cast(SqliteConnection, db))

    async def states_for_email(self, account: str, email: str) -> list[KeyState]:
        """The email's stored states, each with its writes in flight."""
        email = normalize_email(email)
        sql = ("SELECT account, email, preference_id, revision, state FROM key_state "
               "WHERE account = ? AND email = ?")
        answers = await self._answer([("states", sql, [account, email]),
                                      ("write_batches", *list_query([account]))])
        states = decode_rows(answers[0][1])
        with_writes_in_flight(states, list(states), answers[1][1])
        return [key_state(PreferenceKey(account=account, email=email, preference_id=k[2]), row)
                for k, row in sorted(states.items())]

    async def history(self, account: str, email: str) -> list[HistoryEntry]:
        email = normalize_email(email)
        # Sorted here: asked to sort, a planner may walk the account's history by time instead
        # of the email's bucket.
        sql = ("SELECT recorded_at, id, preference_id, side, opted_in, origin_time, change_id, "
               f"decision, corrected_time FROM history WHERE {HISTORY_BY_EMAIL}")
        async with self._reading() as db, \
                db.execute(sql, (account, history_bucket(email), email)) as cur:
            rows = sorted(await cur.fetchall(), key=lambda row: (row[0], row[1]))
        return [HistoryEntry(account=account, email=email, preference_id=p, side=side,
                             opted_in=bool(opted_in), origin_time=from_us(origin),
                             change_id=change_id, decision=decision,
                             recorded_at=from_us(recorded),
                             corrected_time=None if corrected is None else from_us(corrected))
                for recorded, _, p, side, opted_in, origin, change_id, decision, corrected
                in rows]

    async def decided(self, rows: Sequence[ObservationRow[KeyTuple]], *,
                      decisions: Collection[str]) -> set[ObservationRow[KeyTuple]]:
        """Of ``rows``, those whose change the history holds decided for its key and side,
        with its value, under one of ``decisions``: one query per email, by its bucket (asked
        only of the few observations whose placement is uncertain)."""
        by_email: dict[tuple[str, str], list[ObservationRow[KeyTuple]]] = defaultdict(list)
        for row in rows:
            by_email[(row.key[0], row.key[1])].append(row)
        wanted_decisions = sorted(str(d) for d in decisions)
        found: set[ObservationRow[KeyTuple]] = set()
        async with self._reading() as db:
            for (account, email), wanted in by_email.items():
                ids = sorted({row.change_id for row in wanted})
                sql = ("SELECT preference_id, side, change_id, opted_in FROM history "
                       f"WHERE {HISTORY_BY_EMAIL} AND change_id IN ({', '.join('?' * len(ids))})"
                       f" AND decision IN ({', '.join('?' * len(wanted_decisions))})")
                async with db.execute(sql, (account, history_bucket(email), email, *ids,
                                            *wanted_decisions)) as cur:
                    held = {(int(p), str(side), str(change), bool(opted_in))
                            for p, side, change, opted_in in await cur.fetchall()}
                found.update(row for row in wanted if (
                    row.key[2], SIDES[row.side], row.change_id, bool(row.opted_in)) in held)
        return found

    # -- contacts -------------------------------------------------------------------------
    async def load_contacts(self, account: str,
                            emails: Iterable[str]) -> dict[str, ContactState]:
        wanted = list(dict.fromkeys(normalize_email(e) for e in emails))
        async with self._reading() as db:
            rows = await _select_in(db, "SELECT email, status, since, revision FROM contact_state "
                                    "WHERE account = ? AND email", account, wanted)
        return {email: ContactState(account=account, email=email, status=status,
                                    since=from_us(since), revision=revision)
                for email, status, since, revision in rows}

    async def suppressed_among(self, account: str, emails: Collection[str]) -> set[str]:
        # one job; only the suppressed rows come back (a feed lists thousands of contacts a
        # run, seldom a suppressed one)
        wanted = list(emails)
        plan: list[Query] = [
            ("contacts", "SELECT email FROM contact_state WHERE account = ? AND suppressed = 1 "
                         f"AND email IN ({','.join('?' * len(chunk))})", [account, *chunk])
            for chunk in (wanted[i:i + _CHUNK] for i in range(0, len(wanted), _CHUNK))]
        return {row[0] for _, rows in await self._answer(plan) for row in rows}

    async def save_contacts(self, contacts: Sequence[ContactState]) -> None:
        rows = list(map(_contact_row, contacts))
        if not rows:
            return
        await self._write_statements([(_UPSERT_CONTACT, rows, True)])

    # -- checkpoints ----------------------------------------------------------------------
    async def get_checkpoint(self, account: str, source: str) -> str | None:
        sql = "SELECT value FROM checkpoint WHERE account = ? AND source = ?"
        async with self._reading() as db, db.execute(sql, (account, source)) as cur:
            row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def set_checkpoint(self, account: str, source: str, value: str) -> None:
        sql = ("INSERT INTO checkpoint (account, source, value, updated_at) VALUES (?, ?, ?, ?) "
               "ON CONFLICT (account, source) DO UPDATE SET value = excluded.value, "
               "updated_at = excluded.updated_at")
        await self._write_statements([(sql, (account, source, value, now_us()), False)])

    # -- the Dynamics record directory (eligibility included) -------------------------------
    @property
    def directory(self) -> SqliteDirectory:
        return self._directory

    async def mark_eligible(self, account: str, record_ids: Iterable[str]) -> set[str]:
        return await self._directory.mark_eligible(account, record_ids)

    async def follow_ups(self, account: str) -> set[str]:
        return await self._directory.follow_ups(account)

    async def clear_follow_ups(self, account: str, record_ids: Iterable[str]) -> None:
        await self._directory.clear_follow_ups(account, record_ids)

    async def note_email_changes(self, account: str, changes: Sequence[EmailChange]) -> None:
        await self._directory.note_email_changes(account, changes)

    async def email_changes(self, account: str) -> list[EmailChange]:
        return await self._directory.email_changes(account)

    async def clear_email_changes(self, account: str, changes: Sequence[EmailChange]) -> None:
        await self._directory.clear_email_changes(account, changes)

    async def eligible_ids(self, account: str, record_ids: Iterable[str]) -> set[str]:
        found = await self._directory.records(account, list(record_ids))
        return {r for r, ref in found.items() if ref.eligible}

    async def upsert_records(self, account: str, records: Sequence[RecordRef]) -> None:
        await self._directory.upsert_records(account, records)

    async def forget_records(self, account: str, record_ids: Sequence[str]) -> None:
        await self._directory.forget_records(account, record_ids)

    async def records(self, account: str, record_ids: Sequence[str]) -> dict[str, RecordRef]:
        return await self._directory.records(account, record_ids)

    async def emails_of_records(self, account: str, record_ids: Sequence[str]) -> set[str]:
        return await self._directory.emails_of_records(account, record_ids)

    async def records_for_emails(self, account: str,
                                 emails: Iterable[str]) -> dict[str, list[RecordRef]]:
        return await self._directory.records_for_emails(account, emails)

    async def eligible_emails(self, account: str, emails: Iterable[str]) -> set[str]:
        return await self._directory.eligible_emails(account, emails)

    async def upsert_subscriptions(self, account: str, rows: Sequence[SubscriptionRow]) -> None:
        await self._directory.upsert_subscriptions(account, rows)

    async def forget_subscriptions(self, account: str, subscription_ids: Sequence[str]) -> None:
        await self._directory.forget_subscriptions(account, subscription_ids)

    async def subscriptions_for(self, account: str, pairs: Sequence[tuple[str, str]]
                                ) -> dict[tuple[str, str], SubscriptionRow]:
        return await self._directory.subscriptions_for(account, pairs)

    async def defer_writes(self, account: str, keys: Iterable[tuple[int, str]]) -> None:
        await self._directory.defer_writes(account, keys)

    async def deferred_emails(self, account: str, preference_id: int) -> list[str]:
        return await self._directory.deferred_emails(account, preference_id)

    async def clear_deferred(self, account: str, preference_id: int,
                             emails: Sequence[str]) -> None:
        await self._directory.clear_deferred(account, preference_id, emails)

    # -- observations parked while their contact is suppressed (common.store.parking) -------
    async def park_observations(self, observations: Sequence[Observation]) -> None:
        await self._parking.park(observations)

    async def parked_observations(
            self, account: str, emails: Iterable[str], *,
            unplaced: Callable[[Observation], Observation] | None = None) -> list[Observation]:
        return await self._parking.parked(account, emails, unplaced=unplaced or _as_stored)

    async def unpark_observations(self, account: str, emails: Iterable[str]) -> None:
        await self._parking.unpark(account, emails)

    async def mark_resuming(self, account: str, emails: Iterable[str]) -> None:
        await self._parking.mark_resuming(account, emails)

    async def resuming_contacts(self, account: str, emails: Iterable[str]) -> set[str]:
        return await self._parking.resuming(account, emails)

    async def clear_resuming(self, account: str, emails: Iterable[str]) -> None:
        await self._parking.clear_resuming(account, emails)

    # -- coordination of replicas (common.store.coordination) ------------------------------
    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        return await self._coordination.acquire_lease(name, holder, ttl_s)

    async def renew_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        return await self._coordination.renew_lease(name, holder, ttl_s)

    async def release_lease(self, name: str, holder: str) -> None:
        await self._coordination.release_lease(name, holder)

    async def lease_holder(self, name: str) -> str | None:
        return await self._coordination.lease_holder(name)

    async def heartbeat(self, member: str, details: Mapping[str, str],
                        ttl_s: float) -> dict[str, dict[str, str]]:
        return await self._coordination.heartbeat(member, details, ttl_s)

    async def leave(self, member: str, groups: Iterable[str]) -> None:
        await self._coordination.leave(member, groups)

    async def members(self, group: str) -> dict[str, str]:
        return await self._coordination.members(group)

    async def swap_checkpoint(self, account: str, source: str, expected: str | None,
                              value: str) -> bool:
        return await self._coordination.swap_checkpoint(account, source, expected, value)

    async def claim_budget(self, bucket: str, claimer: str, *, tokens: int, limit: int,
                           span_s: float) -> BudgetGrant:
        return await self._coordination.claim_budget(bucket, claimer, tokens=tokens,
                                                     limit=limit, span_s=span_s)

    # -- personal data: erasure and retention (common.store.personal) -----------------------
    async def personal_data(self, account: str, email: str) -> dict[str, int]:
        return await self._personal.held(account, email)

    async def forget_email(self, account: str, email: str) -> dict[str, int]:
        return await self._personal.forget(account, email)

    async def prune_history(self, account: str, *, before: datetime, limit: int = 5000) -> int:
        return await self._personal.prune_history(account, before=before, limit=limit)

    # -- keys with outstanding writes (common.store.outstanding) ---------------------------
    async def outstanding_stats(self, account: str, *,
                                since_before: datetime) -> OutstandingStats:
        return await self._outstanding.stats(account, since_before=since_before)

    async def outstanding_due(self, account: str, *, since_before: datetime, now: datetime,
                              limit: int) -> list[DueKey]:
        return await self._outstanding.due(account, since_before=since_before, now=now,
                                           limit=limit)

    async def postpone_outstanding(self, due: Sequence[tuple[PreferenceKey, datetime]]) -> None:
        await self._outstanding.postpone(due)

    async def drop_outstanding(self, settled: Sequence[tuple[PreferenceKey, int]]) -> None:
        await self._outstanding.drop(settled)

    async def index_outstanding(self, account: str, *, limit: int) -> bool:
        return await self._outstanding.build(account, limit=limit, now_us=now_us())
