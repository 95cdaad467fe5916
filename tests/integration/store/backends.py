"""Ledger store backends for tests: a SQLite file, or a fresh schema on the test PostgreSQL.

PostgreSQL is ``PREFSYNC_TEST_POSTGRES_URL`` (default ``postgresql://root@127.0.0.1:5432/test``,
trust auth). When it is unreachable its tests are skipped, unless ``PREFSYNC_CI``
is set (CI sets it), which makes them fail.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg

from common.store.postgres import postgres_ddl
from tests.harness.postgres import fresh_schema
from tests.harness.unavailable import unavailable

POSTGRES_URL = os.environ.get("PREFSYNC_TEST_POSTGRES_URL",
                              "postgresql://root@127.0.0.1:5432/test")
BACKENDS = ("sqlite", "postgresql")


@asynccontextmanager
async def postgres_schema() -> AsyncIterator[str]:
    """A store URL on a schema of its own, dropped afterwards."""
    async with fresh_schema(POSTGRES_URL, prefix="prefsync_test", unreachable=unavailable) as url:
        yield url


@asynccontextmanager
async def store_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/ledger.db"
        return
    async with postgres_schema() as url:
        yield url


async def make_old_table(backend: str, url: str, *, ddl: str, insert: str,
                         row: Sequence[Any]) -> None:
    """A table as an earlier release made it, with one row (``insert`` ends with ``VALUES``),
    in the (not yet opened) ledger at ``url``."""
    marks = ", ".join("?" * len(row)) if backend == "sqlite" else ", ".join(
        f"${n}" for n in range(1, len(row) + 1))
    if backend == "sqlite":
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
            db.execute(ddl)
            db.execute(f"{insert} ({marks})", tuple(row))
            db.commit()
        return
    schema = url.rsplit("search_path=", 1)[1]
    connection = await asyncpg.connect(POSTGRES_URL)
    try:
        await connection.execute(f"SET search_path = {schema}")
        await connection.execute(postgres_ddl(ddl))
        await connection.execute(f"{insert} ({marks})", *row)
    finally:
        await connection.close()
