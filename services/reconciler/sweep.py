"""The outstanding-work sweep: the safety net behind every ordering rule.

A key is outstanding while a side is not known to hold its register's value. The pipeline's
rules (publish before ack, clear stored work only once its messages are confirmed) keep a write
command in flight for it meanwhile; anything that breaks them unforeseen (a crash window, a
purged queue, a lost message) would leave the key outstanding for good. The sweep finds such
keys in the store's index (:mod:`common.store.outstanding`, kept by every save, so no state is
decoded to find them) and publishes their write commands again:

1. At start-up and every ``interval_s``, per account, in whichever reconciler replica holds the
   account's sweep lease (one at a time; another takes over once a holder's lease expires).
2. A key is swept once its write has been outstanding for ``grace_s`` (the first command
   normally lands well within that), then again while it stays outstanding, backing off:
   after ``max(grace_s, interval_s)``, twice that, and so on up to :data:`MAX_BACKOFF`.
3. Suppressed contacts are left out: their writes are parked on purpose. A write to dotdigital
   keeps the reconciler's rule of waiting for a complete read of its preference
   (:meth:`services.reconciler.service.Reconciler.write_messages`): it is deferred again, not sent.
4. Commands are published confirmed, with message ids derived from what they carry (the same
   writes, the same ids); writers are idempotent and skip what the ledger says is done or
   superseded. Only then is each key's next sweep postponed.
5. Every replica reports how many keys are outstanding beyond the grace period and since when
   the oldest one is (``prefsync_outstanding_keys``, ``prefsync_outstanding_oldest_seconds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from common import domain
from common.cleanup import finish
from common.domain import Side
from common.messaging.amqp import Outgoing, Publisher
from common.messaging.envelope import WriteCommand as WriteMessage
from common.messaging.publishing import envelopes_by_shard, stable_id
from common.messaging.topology import shard_of
from common.store.outstanding import DueKey
from services.reconciler.service import Reconciler

log = logging.getLogger("prefsync.sweep")

# Keys asked of the index, loaded and published at a time.
PAGE = 500
# At most this many keys per pass: a backlog being written normally (a first sync of a large
# account is outstanding for a while) is republished a slice at a time, not all at once.
MAX_KEYS_PER_PASS = 20_000
MAX_BACKOFF = timedelta(days=1)
# The lease outlives a pass by this much; the holder renews it after every page.
LEASE_MARGIN_S = 60.0

StatsObserver = Callable[[str, int, datetime | None], None]


@dataclass(frozen=True, kw_only=True)
class SweepReport:
    """One pass: what was outstanding beyond the grace period, and what this replica did."""

    outstanding: int
    oldest: datetime | None
    swept: bool = False  # False: another replica holds the lease
    published: int = 0
    deferred: int = 0
    settled: int = 0


class OutstandingSweep:
    def __init__(self, *, account: str, store: Any, publisher: Publisher,
                 reconciler: Reconciler, shards: int, holder: str, interval_s: float,
                 grace_s: float, page: int = PAGE, max_keys: int = MAX_KEYS_PER_PASS,
                 on_stats: StatsObserver | None = None,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.account = account
        self._store = store
        self._publisher = publisher
        self._reconciler = reconciler
        self._shards = shards
        self._holder = holder
        self._interval_s = interval_s
        self._grace = timedelta(seconds=grace_s)
        self._backoff = timedelta(seconds=max(grace_s, interval_s))
        self._page = page
        self._max_keys = max_keys
        self._on_stats = on_stats
        self._now = now

    @property
    def lease(self) -> str:
        return f"{self.account}:outstanding-sweep"

    @property
    def _lease_ttl_s(self) -> float:
        return self._interval_s + LEASE_MARGIN_S

    async def run(self) -> None:
        """Sweep at start-up and every ``interval_s`` until cancelled."""
        try:
            while True:
                try:
                    await self.sweep()
                except Exception:
                    # the store or the broker is down: the next pass tries again
                    log.exception("outstanding-work sweep failed", extra={"account": self.account})
                await asyncio.sleep(self._interval_s)
        finally:
            with contextlib.suppress(Exception):
                await finish(self._store.release_lease(self.lease, self._holder),
                             timeout_s=self._lease_ttl_s, what="releasing the sweep lease")

    async def sweep(self) -> SweepReport:
        """One pass: report, and publish the due keys' writes if this replica holds the lease."""
        now = self._now()
        edge = now - self._grace
        stats = await self._store.outstanding_stats(self.account, since_before=edge)
        if self._on_stats is not None:
            self._on_stats(self.account, stats.keys, stats.oldest)
        report = SweepReport(outstanding=stats.keys, oldest=stats.oldest)
        if not await self._store.acquire_lease(self.lease, self._holder, self._lease_ttl_s):
            return report
        # once, for states saved before the index existed
        while not await self._store.index_outstanding(self.account, limit=self._page):
            if not await self._renew():
                return report
        published = deferred = settled = swept = 0
        while swept < self._max_keys:
            due: list[DueKey] = await self._store.outstanding_due(
                self.account, since_before=edge, now=now,
                limit=min(self._page, self._max_keys - swept))
            if not due:
                break
            sent, waiting, done = await self._sweep_page(due, now)
            published, deferred, settled = published + sent, deferred + waiting, settled + done
            swept += len(due)
            if not await self._renew():
                break
        if swept:
            log.warning("outstanding writes published again", extra={
                "account": self.account, "keys": swept, "commands": published,
                "deferred": deferred, "settled": settled})
        return SweepReport(outstanding=stats.keys, oldest=stats.oldest, swept=True,
                           published=published, deferred=deferred, settled=settled)

    async def _renew(self) -> bool:
        if await self._store.renew_lease(self.lease, self._holder, self._lease_ttl_s):
            return True
        log.warning("lost the sweep lease mid-pass; another replica sweeps",
                    extra={"account": self.account})
        return False

    async def _sweep_page(self, due: Sequence[DueKey], now: datetime) -> tuple[int, int, int]:
        """Publish one page's writes; returns (commands published, writes deferred, keys
        found settled)."""
        states = await self._store.load([d.key for d in due])
        contacts = await self._store.load_contacts(self.account, {d.key.email for d in due})
        live = [s for s in states.values() if domain.outstanding(s)]
        messages, to_defer = await self._reconciler.write_messages(live, contacts=contacts)
        if to_defer:
            await self._store.defer_writes(self.account, to_defer)
        commands = [m for per_key in messages.values() for m in per_key]
        await self._publisher.publish_many(self._outgoing(commands))
        # only now that the commands are confirmed
        await self._store.postpone_outstanding(
            [(d.key, now + min(self._backoff * 2 ** min(d.sweeps, 20), MAX_BACKOFF))
             for d in due])
        # Nothing outstanding (any more), or no state at all (a ledger emptied by hand): the
        # row goes, unless a save wrote it since it was read.
        settled = [(k, s.revision) for k, s in states.items() if not domain.outstanding(s)]
        settled += [(d.key, d.revision) for d in due if d.key not in states]
        await self._store.drop_outstanding(settled)
        return len(commands), len(to_defer), len(settled)

    def _outgoing(self, commands: Sequence[WriteMessage]) -> list[Outgoing]:
        """Per side and shard, with ids derived from the commands carried."""
        groups: dict[tuple[Side, int], list[WriteMessage]] = defaultdict(list)
        for command in commands:
            groups[(command.side, shard_of(command.email, self._shards))].append(command)
        outgoing: list[Outgoing] = []
        for (side, _), group in sorted(groups.items()):
            group.sort(key=lambda c: (c.email, c.preference_id))
            seed = stable_id("sweep", side, *(
                f"{c.email}|{c.preference_id}|{c.opted_in}|{c.origin_time.isoformat()}|"
                f"{c.covered}" for c in group))
            outgoing += envelopes_by_shard(
                account=self.account, source="reconciler", type="write-commands",
                changes=group, shards=self._shards, run_id=None, id_seed=seed,
                route="writes", side=side)
        return outgoing
