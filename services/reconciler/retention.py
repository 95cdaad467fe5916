"""History retention: history rows older than ``[store] history_days`` (default 400) are pruned.

It runs in the reconciler, the service whose decisions the history records: every deployment
runs it (``prefsync up`` too), it needs no vendor credentials, and it has the ledger open
anyway. Rules:

1. Only history goes. Key states (registers, what each side holds, the write ledger of recent
   writes) are never pruned: the sync's correctness rests on them.
2. One replica prunes each account per interval: it takes the lease ``history-retention:<account>``
   for the whole interval and keeps it (a later pass by the same replica renews it), so the
   other replicas skip that account until the holder stops renewing (it died or stopped).
3. Rows go in short transactions (``BATCH`` rows each), so the services' own writes to the
   ledger are never held up for long; the lease is renewed between them.
4. A failed pass (the store is down) is logged and retried at the next interval; it never stops
   the service.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

log = logging.getLogger("prefsync.retention")

INTERVAL_S = 3600.0
FIRST_DELAY_S = 60.0  # after start-up, when the backlog of a restart has been taken in hand
BATCH = 5000


def lease_name(account: str) -> str:
    return f"history-retention:{account}"


class HistoryRetention:
    """Prunes the history of ``accounts`` past ``days``, one replica per account at a time."""

    def __init__(self, *, store: Any, accounts: Sequence[str], days: int, holder: str,
                 interval_s: float = INTERVAL_S, first_delay_s: float = FIRST_DELAY_S,
                 batch: int = BATCH,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._store = store
        self._accounts = list(accounts)
        self._days = days
        self._holder = holder
        self._interval_s = interval_s
        self._first_delay_s = first_delay_s
        self._batch = batch
        self._now = now

    async def prune_once(self) -> dict[str, int]:
        """One pass: rows pruned per account this replica holds the lease of (rule 2)."""
        pruned: dict[str, int] = {}
        before = self._now() - timedelta(days=self._days)
        for account in self._accounts:
            name = lease_name(account)
            if not await self._store.acquire_lease(name, self._holder, self._interval_s):
                continue
            total = 0
            while True:
                n = await self._store.prune_history(account, before=before, limit=self._batch)
                total += n
                if n < self._batch:
                    break
                if not await self._store.renew_lease(name, self._holder, self._interval_s):
                    break  # another replica has it now: it goes on from here
                await asyncio.sleep(0)
            pruned[account] = total
            if total:
                log.info("history pruned", extra={"account": account, "rows": total,
                                                  "history_days": self._days})
        return pruned

    async def run(self) -> None:
        """Prune every interval until cancelled (rule 4)."""
        await asyncio.sleep(self._first_delay_s)
        while True:
            try:
                await self.prune_once()
            except Exception as exc:  # the next pass tries again
                log.warning("history retention pass failed", extra={
                    "error": f"{type(exc).__name__}: {exc}"})
            await asyncio.sleep(self._interval_s)
