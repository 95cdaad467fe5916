"""The PostgreSQL ledger of a benchmark world: a schema of its own per world, dropped after.

The server is ``$PREFSYNC_BENCH_POSTGRES_URL`` (default: the tests' server,
``postgresql://root@127.0.0.1:5432/test``, trust auth). Replicas of a service on several
machines share a PostgreSQL ledger, so the scale scenario runs on one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import NoReturn

import asyncpg

from bench.harness import BenchError
from common.store import open_store
from tests.harness.postgres import fresh_schema

POSTGRES_URL = os.environ.get("PREFSYNC_BENCH_POSTGRES_URL",
                              "postgresql://root@127.0.0.1:5432/test")


def _unreachable(why: str) -> NoReturn:
    raise BenchError(why)


async def postgres_unreachable(url: str = POSTGRES_URL) -> str | None:
    """Why the server at ``url`` cannot be used (None: it can)."""
    try:
        connection = await asyncpg.connect(url, timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"PostgreSQL at {url.split('@')[-1]} is not reachable ({type(exc).__name__})"
    await connection.close()
    return None


@contextlib.asynccontextmanager
async def postgres_ledger(url: str = POSTGRES_URL) -> AsyncIterator[str]:
    """A store URL for one world, on a schema of its own, its tables made."""
    async with fresh_schema(url, prefix="prefsync_bench", unreachable=_unreachable) as store:
        # made once here, before the services start: their start-up is then the same in
        # every run, whichever of them comes first
        async with open_store(store):
            pass
        yield store
