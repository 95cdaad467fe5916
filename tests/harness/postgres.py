"""A schema of its own on a PostgreSQL server, for one test or one benchmark world."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import NoReturn

import asyncpg


@asynccontextmanager
async def fresh_schema(url: str, *, prefix: str,
                       unreachable: Callable[[str], NoReturn]) -> AsyncIterator[str]:
    """A store URL on a new schema of the database at ``url``, dropped afterwards;
    ``unreachable(why)`` when the server cannot be reached."""
    try:
        admin = await asyncpg.connect(url, timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        unreachable(f"PostgreSQL is not reachable ({type(exc).__name__}: {exc})")
    schema = f"{prefix}_{secrets.token_hex(6)}"
    try:
        await admin.execute(f"CREATE SCHEMA {schema}")
        separator = "&" if "?" in url else "?"
        yield f"{url}{separator}search_path={schema}"
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.close()
