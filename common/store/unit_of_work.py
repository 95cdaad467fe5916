"""One compare-and-set transaction, tried again when another writer got there first.

The ledger's key states are saved with compare-and-set on their revision
(:class:`~common.store.ConflictError` when one moved). Whoever saves them builds the new
states from what it loaded, and on a conflict builds them again from what is stored now:

1. ``attempt(n)`` builds and saves (``n`` counts from 0: from 1 on, it loads afresh);
2. a :class:`~common.store.ConflictError` runs it again, up to ``retries`` times in all, after
   a short random pause (full jitter from 5 ms, doubling, at most 100 ms). Conflicts come from
   processes saving the same keys at once: the writer recording a write while the reconciler
   folds a newer change of the key, or two replicas while a shard moves between them. The
   pause keeps two of them from meeting again in step, so they settle within a few attempts;
3. conflicts that do not settle are a :class:`~common.messaging.resilience.TransientFailure`
   of the store: the batch is retried later (the consumer holds it, with the store's breaker
   open, for seconds), nothing is lost.

An ``attempt`` may also load and save where no other process saves, on a ledger that can hold
its key states (:meth:`~common.store.interface.KeyStates.holding`): the writer's attempts after
the first do, so on SQLite its second attempt is its last.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from common.messaging.breakers import RetryPolicy
from common.messaging.resilience import TransientFailure
from common.store.interface import ConflictError

MAX_CONFLICT_RETRIES = 8
CONFLICT_BACKOFF = RetryPolicy(base_s=0.005, cap_s=0.1)

T = TypeVar("T")


async def commit_with_retry(attempt: Callable[[int], Awaitable[T]], *,
                            retries: int = MAX_CONFLICT_RETRIES,
                            on_conflict: Callable[[int], None] | None = None,
                            pause: Callable[[float], Awaitable[None]] = asyncio.sleep) -> T:
    """``attempt``'s result once it saved without a conflict (rules 1-3); ``on_conflict`` is
    told the number of each attempt that met one; ``pause`` waits between attempts."""
    for number in range(retries):
        if number:
            await pause(CONFLICT_BACKOFF.delay(number - 1))
        try:
            return await attempt(number)
        except ConflictError:
            if on_conflict is not None:
                on_conflict(number + 1)
    raise TransientFailure("ledger conflicts did not settle", dependency="store")
