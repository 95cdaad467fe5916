"""One compare-and-set transaction, tried again when another writer got there first.

The ledger's key states are saved with compare-and-set on their revision
(:class:`~common.store.ConflictError` when one moved). Whoever saves them builds the new
states from what it loaded, and on a conflict builds them again from what is stored now:

1. ``attempt(n)`` builds and saves (``n`` counts from 0: from 1 on, it loads afresh);
2. a :class:`~common.store.ConflictError` runs it again, up to ``retries`` times in all
   (conflicts happen only while shards move between replicas, so they settle fast);
3. conflicts that do not settle are a :class:`~common.messaging.resilience.TransientFailure`
   of the store: the batch is retried later, nothing is lost.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from common.messaging.resilience import TransientFailure
from common.store.interface import ConflictError

MAX_CONFLICT_RETRIES = 5

T = TypeVar("T")


async def commit_with_retry(attempt: Callable[[int], Awaitable[T]], *,
                            retries: int = MAX_CONFLICT_RETRIES,
                            on_conflict: Callable[[int], None] | None = None) -> T:
    """``attempt``'s result once it saved without a conflict (rules 1-3); ``on_conflict`` is
    told the number of each attempt that met one."""
    for number in range(retries):
        try:
            return await attempt(number)
        except ConflictError:
            if on_conflict is not None:
                on_conflict(number + 1)
    raise TransientFailure("ledger conflicts did not settle", dependency="store")
