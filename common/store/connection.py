"""What the ledger's SQL modules use of a database connection.

aiosqlite's connection has this shape; the PostgreSQL store hands the same SQL (``?``
parameters, portable statements) to PostgreSQL through an adapter of this shape, so each part of
the ledger (directory, parking, coordination) is written once for both databases.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
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


# One transaction per use: ``async with transaction() as db``; committed when the block ends.
Transaction = Callable[[], AbstractAsyncContextManager[Connection]]
