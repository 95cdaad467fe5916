"""PostgreSQL ledger store (asyncpg), for replicas on more than one machine.

It runs the SQLite store's SQL, which sticks to what both databases accept, through an adapter
with the SQLite connection's shape (:class:`~common.store.connection.Connection`; ``?``
parameters become ``$n``), so every part of the ledger is written
once. What PostgreSQL needs differently is here:

- a connection pool instead of one connection, so transactions of different shards run at once;
- the tables are created from the same statements with PostgreSQL's types (BIGINT, BYTEA);
- compare-and-set: SQLite's ``BEGIN IMMEDIATE`` serialises writers, PostgreSQL's default
  isolation does not. A save's stored keys are written with the revision check inside the
  update, which takes their rows' locks as it writes them, and a row whose revision moved
  meanwhile is not written: the save is a conflict and rolls back. Keys not stored yet have no
  row to lock: the save first takes a transaction-scoped advisory lock per email of those
  (sorted). Row locks are kept in the rows themselves; advisory locks take room in
  PostgreSQL's shared lock table (``max_locks_per_transaction`` x connections), which saves
  of thousands of stored emails, locked by email, ran out ("out of shared memory"). Should two
  saves still meet on rows in opposite orders, PostgreSQL fails one of them, and that one is a
  conflict, tried again. Each write is over arrays in one statement.

``postgresql://user@host:5432/db`` (``postgres://`` too); extra query parameters are session
settings, e.g. ``?search_path=prefsync`` to keep the ledger in its own schema.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from common.domain import PreferenceKey
from common.domain.rows import KeyTuple, key_of
from common.store.batch_reads import Part, Query
from common.store.connection import Connection, Statement
from common.store.interface import ConflictError, RowStates, StoreUnavailable
from common.store.sqlite import (
    ADDED_COLUMNS,
    AFTER_COLUMNS,
    SCHEMA_STATEMENTS,
    SaveBatch,
    SqliteLedgerStore,
    settle_schema,
)

log = logging.getLogger("prefsync.store")

POOL_SIZE = 10
# Serialises schema creation between processes starting at once (an arbitrary fixed key).
_SCHEMA_LOCK = 0x70726566_73796E63 >> 1


def redacted(url: str) -> str:
    """``url`` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


@lru_cache(maxsize=512)
def to_postgres(sql: str) -> str:
    """``?`` parameters as ``$1``, ``$2``, ... (our statements hold no literal question marks)."""
    counter = iter(range(1, 1_000_000))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


# What this code's tables look like, as a stamp in the ledger's meta table: a ledger stamped so
# is opened without DDL.
_DDL = "\n".join([*SCHEMA_STATEMENTS, *(" ".join(column) for column in ADDED_COLUMNS),
                  *AFTER_COLUMNS])
DDL_STAMP = hashlib.sha256(_DDL.encode()).hexdigest()[:16]
# Tries at making the schema when PostgreSQL breaks a deadlock by failing ours.
SCHEMA_TRIES = 5


async def _make_schema(pool: asyncpg.Pool) -> None:
    """Make (or check) the ledger's tables, as several processes starting at once do.

    1. A ledger stamped with this code's :data:`DDL_STAMP` gets no DDL at all, only the
       version check: DDL locks its table even when there is nothing to do (``ALTER TABLE
       ... ADD COLUMN IF NOT EXISTS`` takes an exclusive lock first), and a service opening
       the ledger while others work in it would wait for them, or deadlock with them.
    2. Otherwise the DDL runs in one transaction behind an advisory lock, so processes
       starting together make the tables one at a time; the stamp is its last statement.
    3. A deadlock PostgreSQL broke by failing our transaction (with a service already at
       work) is tried again, after a short backoff, up to :data:`SCHEMA_TRIES` times."""
    for attempt in range(1, SCHEMA_TRIES + 1):
        try:
            async with pool.acquire() as connection, connection.transaction():
                db = PostgresConnection(connection)
                if await _stamped(connection):
                    await settle_schema(db)
                    return
                await connection.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
                for statement in SCHEMA_STATEMENTS:
                    await connection.execute(postgres_ddl(statement))
                for table, column, kind in ADDED_COLUMNS:
                    await connection.execute(postgres_ddl(
                        f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}"))
                for statement in AFTER_COLUMNS:
                    await connection.execute(postgres_ddl(statement))
                await settle_schema(db)
                await connection.execute(
                    "INSERT INTO meta (name, value) VALUES ('ddl', $1) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value", DDL_STAMP)
                return
        except asyncpg.DeadlockDetectedError:
            if attempt == SCHEMA_TRIES:
                raise
            log.warning("making the ledger's tables deadlocked with another process; "
                        "trying again", extra={"attempt": attempt})
            await asyncio.sleep(0.1 * attempt * (0.5 + random.random()))


async def _stamped(connection: asyncpg.pool.PoolConnectionProxy) -> bool:
    """Whether the ledger's tables are this code's already (rule 1)."""
    exists = await connection.fetchval(
        "SELECT to_regclass('meta') IS NOT NULL")
    if not exists:
        return False
    return bool(await connection.fetchval(
        "SELECT value = $1 FROM meta WHERE name = 'ddl'", DDL_STAMP))


def postgres_ddl(statement: str) -> str:
    """A table or index statement of the ledger with PostgreSQL's column types."""
    statement = re.sub(r"\bINTEGER PRIMARY KEY\b",
                       "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", statement)
    statement = re.sub(r"\bINTEGER\b", "BIGINT", statement)
    return re.sub(r"\bBLOB\b", "BYTEA", statement)


# The compare-and-set writes of common.store.sqlite, each over arrays (one column each) in one
# statement: the updates, counted by their command tag, and the inserts, which answer the keys
# they wrote.
_UPDATE_STATES = """
    UPDATE key_state AS k SET revision = u.revision, state = u.state
    FROM unnest(CAST(? AS BIGINT[]), CAST(? AS BYTEA[]), CAST(? AS TEXT[]), CAST(? AS TEXT[]),
                CAST(? AS BIGINT[]), CAST(? AS BIGINT[]))
         AS u (revision, state, account, email, preference_id, expected)
    WHERE k.account = u.account AND k.email = u.email AND k.preference_id = u.preference_id
      AND k.revision = u.expected"""

_INSERT_STATES = """
    INSERT INTO key_state (account, email, preference_id, revision, state)
    SELECT * FROM unnest(CAST(? AS TEXT[]), CAST(? AS TEXT[]), CAST(? AS BIGINT[]),
                         CAST(? AS BIGINT[]), CAST(? AS BYTEA[]))
    ON CONFLICT (account, email, preference_id) DO NOTHING
    RETURNING account, email, preference_id"""


def _lock_id(key: KeyTuple) -> int:
    """The advisory lock a save of ``key`` (not stored yet) takes: its email's, so a save holds
    one lock per email, not one per key (PostgreSQL keeps advisory locks in a shared table of
    ``max_locks_per_transaction`` x connections entries)."""
    account, email, _ = key
    digest = hashlib.blake2b(f"{account}\x1f{email}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class _Moved(Exception):
    """A save's update met rows whose revisions moved: its transaction rolls back."""


class PostgresConnection:
    """An asyncpg connection in a transaction, with the shape the ledger's SQL expects."""

    def __init__(self, connection: asyncpg.pool.PoolConnectionProxy) -> None:
        self._connection = connection

    def execute(self, sql: str, parameters: Iterable[Any] | None = None) -> Statement:
        args = list(parameters or ())

        async def run() -> list[Any]:
            return list(await self._connection.fetch(to_postgres(sql), *args))

        return Statement(run)

    async def rows_written(self, sql: str, parameters: Iterable[Any]) -> int:
        """How many rows ``sql`` (an UPDATE, INSERT or DELETE) wrote, from its command tag:
        no row comes back."""
        tag = await self._connection.execute(to_postgres(sql), *parameters)
        return int(tag.rpartition(" ")[2])

    def executemany(self, sql: str, parameters: Iterable[Iterable[Any]]) -> Statement:
        rows = [tuple(p) for p in parameters]

        async def run() -> list[Any]:
            if rows:
                await self._connection.executemany(to_postgres(sql), rows)
            return []

        return Statement(run)


class PostgresLedgerStore(SqliteLedgerStore):
    """The ledger in PostgreSQL: the same tables, queries and behaviour as the SQLite store."""

    def __init__(self, *, url: str, pool_size: int = POOL_SIZE) -> None:
        super().__init__(path=redacted(url))
        self._url = url
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None

    def __repr__(self) -> str:
        return f"PostgresLedgerStore(url={redacted(self._url)!r})"

    async def open(self) -> None:
        if self._pool is not None:
            return
        where = urlsplit(self._url).hostname or "localhost"
        try:
            pool = await asyncpg.create_pool(self._url, min_size=1, max_size=self._pool_size)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"cannot open the ledger on PostgreSQL at {where}: "
                                   f"{type(exc).__name__}: {exc}",
                                   transient=isinstance(exc, (
                                       OSError, asyncpg.CannotConnectNowError,
                                       asyncpg.TooManyConnectionsError))) from None
        try:
            await _make_schema(pool)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[PostgresConnection]:
        if self._pool is None:
            raise RuntimeError("the ledger store is not open")
        async with self._pool.acquire() as connection, connection.transaction():
            yield PostgresConnection(connection)

    def _reading(self) -> AbstractAsyncContextManager[Connection]:
        return self._transaction()

    async def _write_statements(self, statements: Sequence[tuple[str, Sequence[Any], bool]]
                                ) -> None:
        async with self._transaction() as db:
            for sql, parameters, many in statements:
                await (db.executemany(sql, parameters) if many else db.execute(sql, parameters))

    async def _answer(self, plan: Sequence[Query]) -> list[tuple[Part, list[Any]]]:
        """Each query's part and rows, all from one snapshot: a read-only repeatable-read
        transaction (at the default isolation each statement would see what had committed
        when it began, so key states and the write batches deleted with their outcome could
        be read from either side of a commit)."""
        if self._pool is None:
            raise RuntimeError("the ledger store is not open")
        answers: list[tuple[Part, list[Any]]] = []
        async with self._pool.acquire() as connection, connection.transaction(
                isolation="repeatable_read", readonly=True):
            db = PostgresConnection(connection)
            for part, sql, params in plan:
                async with db.execute(sql, params) as cur:
                    answers.append((part, list(await cur.fetchall())))
        return answers

    async def _write(self, batch: SaveBatch) -> list[int]:
        try:
            async with self._transaction() as db:
                updates, inserts = batch.updates(), batch.inserts()
                if inserts:
                    # new keys: their emails held until this transaction ends (sorted)
                    locks = sorted({_lock_id(row[:3]) for row in inserts})
                    await db.execute("SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(? AS "
                                     "BIGINT[])) WITH ORDINALITY AS t (k, n) ORDER BY n", (locks,))
                if updates:
                    # stored keys: their rows, locked by the update as it writes them
                    columns = [list(column) for column in zip(*updates, strict=True)]
                    if await db.rows_written(_UPDATE_STATES, columns) != len(updates):
                        raise _Moved  # rolled back: nothing of this save is written
                if inserts:
                    columns = [list(column) for column in zip(*inserts, strict=True)]
                    async with db.execute(_INSERT_STATES, columns) as cursor:
                        written = {(a, e, p) for a, e, p in await cursor.fetchall()}
                    if len(written) != len(inserts):
                        raise ConflictError([key_of(row[:3]) for row in inserts
                                             if row[:3] not in written])
                for sql, rows in batch.statements(in_lock_order=True):
                    await db.executemany(sql, rows)
        except _Moved:
            raise ConflictError(await self._moved(batch)) from None
        except asyncpg.DeadlockDetectedError:
            # two saves met on rows in opposite orders; PostgreSQL undid this one: it is tried
            # again, as a conflict
            raise ConflictError(list(map(key_of, batch.keys))) from None
        return batch.revisions

    def holding(self) -> AbstractAsyncContextManager[RowStates] | None:
        """None: replicas save at once here, each locking only the rows it writes; holding
        every key state (the table) for one save would make them wait on each other."""
        return None

    async def _moved(self, batch: SaveBatch) -> list[PreferenceKey]:
        """The keys of ``batch`` whose stored revisions are not those it expects, read once its
        transaction rolled back (all of them when none are: it met a conflict that is over)."""
        stored: list[tuple[str, str, int, int]] = []
        async with self._reading() as db:
            for sql, params in batch.revision_queries():
                async with db.execute(sql, params) as cursor:
                    stored.extend(await cursor.fetchall())
        return batch.moved(stored)
