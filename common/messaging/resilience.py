"""Which failures are transient, and whose outage explains them.

A handler's exception is one of two things:

1. **transient**: a dependency is down or refused us for now (the ledger store, the broker, a
   vendor's 5xx/429/timeout, credentials a vendor refused). The message is fine; the work is
   retried in place, with backoff, once the dependency is back. :func:`dependency_of` names it.
2. **permanent**: the message itself can never be processed (it fails validation, or the vendor
   refused its content for good). Only that message goes to the dead-letter queue, with its
   reason.

Anything not recognised as transient is treated as a possible bad message: the consumer splits
the batch to find it, so a healthy message is never dead-lettered because a neighbour is bad.
"""

from __future__ import annotations

import sqlite3
from typing import Literal

import aiormq.exceptions

from common.vendors.base import AuthenticationError, TransportError, VendorError

Dependency = Literal["store", "broker", "dataverse", "dotdigital"]
DEPENDENCIES: tuple[Dependency, ...] = ("store", "broker", "dataverse", "dotdigital")


class TransientFailure(Exception):
    """Raised by a handler when ``dependency`` is unavailable: retry later, never dead-letter."""

    def __init__(self, reason: str, *, dependency: Dependency) -> None:
        super().__init__(reason)
        self.reason = reason
        self.dependency: Dependency = dependency


def _vendor(name: str) -> Dependency:
    return "dataverse" if name.lower() in ("dataverse", "dynamics") else "dotdigital"


def dependency_of(exc: BaseException) -> Dependency | None:
    """The dependency whose outage explains ``exc``, or None when ``exc`` is not transient."""
    if isinstance(exc, TransientFailure):
        return exc.dependency
    if isinstance(exc, AuthenticationError):
        # refused credentials are an operator's problem, never a reason to drop a message
        return _vendor(exc.vendor)
    if isinstance(exc, VendorError):
        return _vendor(exc.vendor) if exc.retryable else None
    if isinstance(exc, TransportError):
        return _vendor(exc.vendor)
    if isinstance(exc, sqlite3.OperationalError):
        return "store"  # locked, busy, disk I/O, unable to open
    if _is_postgres_outage(exc):
        return "store"
    if isinstance(exc, aiormq.exceptions.AMQPError | aiormq.exceptions.ChannelInvalidStateError):
        return "broker"
    if isinstance(exc, OSError):
        # connection refused or reset, timeouts: the vendor clients and the broker wrap their
        # own, so a bare one comes from the ledger store's driver
        return "store"
    if isinstance(exc, ExceptionGroup) and exc.exceptions:
        found = [dependency_of(e) for e in exc.exceptions]
        return found[0] if all(found) else None
    cause = exc.__cause__
    return dependency_of(cause) if cause is not None and cause is not exc else None


def _is_postgres_outage(exc: BaseException) -> bool:
    try:
        import asyncpg
    except ImportError:  # pragma: no cover - asyncpg is a dependency
        return False
    from common.store.interface import StoreUnavailable
    return isinstance(exc, StoreUnavailable | asyncpg.PostgresConnectionError
                      | asyncpg.InterfaceError | asyncpg.CannotConnectNowError
                      | asyncpg.exceptions.ConnectionDoesNotExistError
                      | asyncpg.exceptions.TooManyConnectionsError
                      | asyncpg.exceptions.AdminShutdownError
                      | asyncpg.exceptions.CrashShutdownError
                      | asyncpg.exceptions.CannotConnectNowError)
