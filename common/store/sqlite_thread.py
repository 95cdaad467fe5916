"""The SQLite ledger's connection: a sqlite3 connection owned by one thread of its own.

Every use of the connection runs in that thread, in the order it was asked for, so the event
loop never waits on SQLite (a write lock held by another process, a long batch). Two ways in:

1. :meth:`SqliteConnection.execute` / :meth:`~SqliteConnection.executemany`, the shape of
   :class:`~common.store.connection.Connection` the ledger's shared SQL is written against:
   one trip to the thread per statement, its rows fetched in the same trip;
2. :meth:`SqliteConnection.run`: a whole function over the sqlite3 connection in one trip,
   e.g. a transaction of many statements (:func:`transact`). The hot paths (loading and saving
   a batch of key states) go this way: a trip to the thread costs far more CPU than a
   statement on a warm page cache.

aiosqlite offers no public way to run a function in its thread, hence a thread of our own.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from common.store.connection import Statement

T = TypeVar("T")


class SqliteConnection:
    """A sqlite3 connection in autocommit mode (transactions are begun explicitly), used only
    from its own single thread."""

    def __init__(self, connection: sqlite3.Connection, thread: ThreadPoolExecutor) -> None:
        self._connection = connection
        self._thread = thread

    @classmethod
    async def connect(cls, path: str) -> SqliteConnection:
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        try:
            connection = await asyncio.get_running_loop().run_in_executor(
                thread, functools.partial(sqlite3.connect, path, isolation_level=None,
                                          check_same_thread=False))
        except BaseException:
            thread.shutdown(wait=False)
            raise
        return cls(connection, thread)

    def run(self, job: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """``job(connection)`` in the connection's thread, after whatever was asked before.
        Once started it runs to its end, even if the caller stops waiting."""
        return asyncio.get_running_loop().run_in_executor(self._thread, job, self._connection)

    def execute(self, sql: str, parameters: Iterable[Any] | None = None) -> Statement:
        params = tuple(parameters or ())
        return Statement(lambda: self.run(lambda c: c.execute(sql, params).fetchall()))

    def executemany(self, sql: str, parameters: Iterable[Iterable[Any]]) -> Statement:
        rows = [tuple(p) for p in parameters]
        return Statement(lambda: self.run(lambda c: c.executemany(sql, rows).fetchall()))

    async def close(self) -> None:
        """Close once what was asked before has run."""
        try:
            await self.run(lambda c: c.close())
        finally:
            self._thread.shutdown(wait=False)


def transact(connection: sqlite3.Connection, begin: str,
             work: Callable[[sqlite3.Connection], T]) -> T:
    """In the connection's thread: ``work`` in one transaction, committed if it returns, rolled
    back if anything raises (the commit included); the connection is left outside any
    transaction either way."""
    connection.execute(begin)
    try:
        result = work(connection)
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    return result
