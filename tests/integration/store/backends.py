"""Ledger store backends for tests: a SQLite file, or a fresh schema on the test PostgreSQL.

PostgreSQL is ``PREFSYNC_TEST_POSTGRES_URL`` (default ``postgresql://root@127.0.0.1:5432/test``,
trust auth). When it is unreachable its tests are skipped, unless ``PREFSYNC_CI``
is set (CI sets it), which makes them fail.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

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
