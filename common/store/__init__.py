"""The ledger store: per-key sync state (compare-and-set), history, contact suppression state,
poller checkpoints and eligibility. ``open_store(url)`` picks the implementation from the URL."""

from __future__ import annotations

from common.store.interface import Change, ConflictError, LedgerStore
from common.store.sqlite import SqliteLedgerStore

__all__ = ["Change", "ConflictError", "LedgerStore", "SqliteLedgerStore", "open_store"]

_SQLITE = "sqlite:///"


def open_store(url: str, *, cache_mib: int | None = None) -> LedgerStore:
    """A store for ``url`` (not yet connected: ``async with open_store(url) as store``).

    ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``, ``sqlite:///:memory:``;
    ``postgresql://user@host:5432/db[?search_path=schema]`` (several machines).
    Anything else raises ``ValueError`` naming only the URL scheme (URLs may carry credentials).
    ``cache_mib``: SQLite's page cache for the connection (None: SQLite's default); PostgreSQL
    has no per-connection page cache to set.
    """
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        raise ValueError("ledger store URL must look like scheme://...")
    if scheme in ("postgresql", "postgres"):
        from common.store.postgres import PostgresLedgerStore  # asyncpg only when used

        return PostgresLedgerStore(url=url)
    if scheme != "sqlite":
        raise ValueError(f"unsupported ledger store URL scheme {scheme!r} "
                         "(supported: sqlite, postgresql)")
    if not url.startswith(_SQLITE):
        raise ValueError("sqlite ledger store URL must be sqlite:///path (no host part)")
    path = url[len(_SQLITE):]
    if not path or "?" in path or "#" in path:
        raise ValueError("sqlite ledger store URL needs a plain file path or :memory:")
    return SqliteLedgerStore(path=path, cache_mib=cache_mib)
