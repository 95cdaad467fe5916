"""What the ledger's SQL modules use of a database connection.

The SQLite store's connection (:mod:`common.store.sqlite_thread`) has this shape;
the PostgreSQL store hands the same SQL (``?`` parameters, portable statements) to PostgreSQL
through an adapter of this shape, so each part of the ledger (directory, parking, coordination)
is written once for both databases.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Iterable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Protocol


class Cursor(Protocol):
    async def fetchall(self) -> Iterable[Any]: ...

    async def fetchone(self) -> Any: ...


class Execution(Protocol):
    """A statement being run: await it, or use it as ``async with ... as cursor``."""

    def __await__(self) -> Generator[Any, None, Cursor]: ...

    async def __aenter__(self) -> Cursor: ...

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None: ...


class Connection(Protocol):
    def execute(self, sql: str, parameters: Iterable[Any] | None = None) -> Execution: ...

    def executemany(self, sql: str, parameters: Iterable[Iterable[Any]]) -> Execution: ...


class FetchedRows:
    """A statement's rows, fetched as it ran (one round trip, not one per fetch)."""

    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows

    async def fetchall(self) -> list[Any]:
        return self._rows

    async def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None


class Statement:
    """A statement sent when awaited or entered (:class:`Execution`): ``run`` sends it and
    returns its rows."""

    def __init__(self, run: Callable[[], Awaitable[list[Any]]]) -> None:
        self._run = run

    async def _cursor(self) -> FetchedRows:
        return FetchedRows(await self._run())

    def __await__(self) -> Generator[Any, None, FetchedRows]:
        return self._cursor().__await__()

    async def __aenter__(self) -> FetchedRows:
        return await self._cursor()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None


# One transaction per use: ``async with transaction() as db``; committed when the block ends.
Transaction = Callable[[], AbstractAsyncContextManager[Connection]]
