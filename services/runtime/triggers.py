"""When a poller runs: triggers from the control queue and the account's schedule, coalesced.

A trigger is recorded in the store and acked at once (a run can outlast the broker's consumer
timeout); the run loop then takes every pending trigger and makes one run of them, so a trigger
that arrives during a run is coalesced into the next run, never lost. A run left unfinished by a
crash is pending again at start-up.

A run that fails (a vendor or the store down, anything it raised) reports ``run-failed`` and
stays pending: the loop runs it again after a backoff that doubles with each failure in a row
(with jitter, up to ``retry_max_s``), so the work it owed is done once the fault heals, without a
new trigger and without a hot loop. A new trigger starts a run at once, covering the failed one.

Replicas: the trigger queue has a single active consumer, and a run holds the account's poller
lease in the store (renewed while it runs), so two replicas never poll one account at once. The
pending runs are updated with compare-and-set, so triggers recorded by one replica are never
lost to another's update. Every replica looks for pending runs now and then, so a run left by a
replica that died is taken over once its lease expires.

Schedule: the configured one unless ``prefsync schedule`` stored an override
(:mod:`services.runtime.schedules`); it is read again each time the loop wakes, and a trigger with
reason ``schedule-changed`` only wakes the loop (it starts no run), so a change of schedule
takes effect without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from common.cleanup import finish
from common.config import RunsConfig
from common.messaging.amqp import DeadLetterer, Delivery, Publisher, QueueConsumer
from common.messaging.envelope import EligibleContact
from common.messaging.publishing import publish_progress
from common.messaging.topology import Topology
from common.runs import RunRequest, new_run_id
from common.schedule import Schedule, parse_schedule
from common.store.checkpoints import last_run, pending_runs
from common.store.interface import Checkpoints, Coordination
from services.runtime.schedules import SCHEDULE_CHANGED, effective_schedule

log = logging.getLogger("prefsync.triggers")

# A run holds its lease this long past each renewal, renewed every third of it ([runs]).
_RUNS = RunsConfig()
# How often an idle coordinator looks for runs pending in the store (left by another replica),
# and how soon it tries again while another replica holds the lease.
PENDING_POLL_S = 10.0
LEASE_RETRY_S = 1.0
# A failed run is tried again after RETRY_BASE_S, doubled per failure in a row, up to RETRY_MAX_S.
RETRY_BASE_S = 2.0
RETRY_MAX_S = 300.0


RunOutcome = Literal["done", "failed", "lease-lost"]


class LeaseLost(RuntimeError):
    """Another replica took the lease over (this one stalled past its TTL); it runs instead."""


class RunStore(Checkpoints, Coordination, Protocol):
    """What the coordinator needs of the ledger store."""


class RunCoordinator:
    def __init__(self, *, service: str, account: str, store: RunStore, publisher: Publisher,
                 run_cycle: Callable[[RunRequest], Awaitable[None]],
                 schedule: str | None = None, holder: str | None = None,
                 lease_ttl_s: float = _RUNS.lease_ttl_s,
                 lease_renew_s: float = _RUNS.lease_renew_s,
                 pending_poll_s: float = PENDING_POLL_S, retry_base_s: float = RETRY_BASE_S,
                 retry_max_s: float = RETRY_MAX_S) -> None:
        self.service = service
        self.account = account
        self._store = store
        self._publisher = publisher
        self._run_cycle = run_cycle
        # the configured schedule (None: this poller is never scheduled, it is started)
        self._configured = schedule
        self._schedule: Schedule | None = parse_schedule(schedule) if schedule else None
        self._wake = asyncio.Event()
        self.idle = asyncio.Event()
        self._holder = holder or uuid.uuid4().hex
        self._lease_ttl_s = lease_ttl_s
        self._lease_renew_s = lease_renew_s
        self._pending_poll_s = pending_poll_s
        self._retry_base_s = retry_base_s
        self._retry_max_s = retry_max_s
        # runs failed in a row (reset by a run that completes)
        self.failures = 0

    @property
    def lease(self) -> str:
        return f"{self.account}:{self.service}"


    async def handle_triggers(self, batch: Sequence[Delivery]) -> None:
        """Queue handler: remember the triggers durably, then they are acked."""
        added = [{
            "run_id": delivery.envelope.run_id or delivery.envelope.change_id,
            "emails": [c.email for c in delivery.envelope.changes
                       if isinstance(c, EligibleContact)],
            "reason": str(delivery.envelope.extra.get("reason", "")),
        } for delivery in batch]
        # a changed schedule only wakes the loop, which reads it again
        added = [a for a in added if a["reason"] != SCHEDULE_CHANGED]
        if added:
            await self._update_pending(lambda pending: [*pending, *added])
        self._wake.set()

    async def _load_pending(self) -> list[dict[str, Any]]:
        return await pending_runs(self.service).get_or(self._store, self.account, [])

    async def _update_pending(self, change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
                              ) -> list[dict[str, Any]]:
        """Read-modify-write of the pending runs, compare-and-set (replicas update it too)."""
        return await pending_runs(self.service).update(
            self._store, self.account, lambda pending: change(pending or []))

    def _retry_delay(self) -> float:
        """Seconds before a failed run is tried again: doubles per failure, half of it jitter."""
        doubled: float = self._retry_base_s * 2.0 ** min(32, max(0, self.failures - 1))
        ceiling = min(self._retry_max_s, doubled)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    async def run_loop(self) -> None:
        self._wake.set()  # look for runs left pending by an earlier process
        retry_s = self._pending_poll_s
        while True:
            try:
                retry_s = await self._loop_once(retry_s)
            except asyncio.CancelledError:
                raise
            except Exception:
                # the loop's own bookkeeping failed (the store or the broker is down): the
                # pending runs are still in the store; look again after a backoff
                self.failures += 1
                delay = self._retry_delay()
                log.warning("run loop failed; trying again in %.1f s", delay, exc_info=True,
                            extra={"account": self.account, "service": self.service})
                # waited here, not as the next wait for a trigger: a wake-up left set by the
                # failed pass would end that wait at once (a hot loop while the store is down)
                await asyncio.sleep(delay)
                self._wake.set()  # then look at what is pending again
                retry_s = self._pending_poll_s

    async def _loop_once(self, retry_s: float) -> float:
        """Wait for a trigger (or ``retry_s``), then run what is pending; returns how long to
        wait at most next time."""
        due_s = await self._seconds_to_next_scheduled()
        wait_s = retry_s if due_s is None else min(due_s, retry_s)
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=wait_s)
        except TimeoutError:
            if due_s is not None and due_s <= wait_s:
                await self._add_scheduled_trigger()
        self._wake.clear()
        pending = await self._load_pending()
        if not pending:
            self.idle.set()
            return self._pending_poll_s
        self.idle.clear()
        if not await self._store.acquire_lease(self.lease, self._holder, self._lease_ttl_s):
            return LEASE_RETRY_S  # another replica is running this account's poller
        try:
            # what is pending now: another replica may have run some while we waited
            pending = await self._load_pending()
            outcome = await self._run(pending) if pending else "done"
        finally:
            with contextlib.suppress(Exception):
                # past the lease's time, releasing it is moot
                await finish(self._store.release_lease(self.lease, self._holder),
                             timeout_s=self._lease_ttl_s, what="releasing the poller lease")
        if outcome == "lease-lost":
            return self._pending_poll_s
        if outcome == "failed":
            # still pending: tried again after the backoff (or at once for a new trigger)
            delay = self._retry_delay()
            log.info("run failed %d time(s) in a row; trying again in %.1f s", self.failures,
                     delay, extra={"account": self.account, "service": self.service})
            return delay
        if await self._load_pending():
            self._wake.set()
        else:
            self.idle.set()
        return self._pending_poll_s

    async def _run(self, pending: list[dict[str, Any]]) -> RunOutcome:
        """One run of the pending triggers, holding the lease.

        1. It completes: its triggers are no longer pending.
        2. It fails: ``run-failed`` is reported and its triggers stay pending, to run again.
        3. The lease was lost: another replica runs them."""
        request = RunRequest(
            run_id=pending[0]["run_id"],
            covers=tuple(dict.fromkeys(p["run_id"] for p in pending)),
            eligible_emails=tuple(dict.fromkeys(e for p in pending for e in p["emails"])),
            reasons=tuple(p.get("reason", "") for p in pending),
        )
        for covered in request.covers:
            await publish_progress(self._publisher, account=self.account, run_id=covered,
                                   event="run-started",
                                   fields={"service": self.service, "run": request.run_id})
        try:
            await self._holding_lease(self._run_cycle(request))
        except asyncio.CancelledError:
            raise
        except LeaseLost:
            log.warning("lost the poller lease mid-run; another replica runs it",
                        extra={"account": self.account, "service": self.service})
            return "lease-lost"
        except Exception as exc:
            self.failures += 1
            log.exception("sync run failed", extra={"account": self.account,
                                                    "service": self.service})
            # Advisory only (the triggers stay pending whatever happens here); the schedule
            # counts from the last attempt, so a failing run does not make it due at once.
            with contextlib.suppress(Exception):
                await last_run(self.service).set(self._store, self.account, datetime.now(UTC))
            for covered in request.covers:
                with contextlib.suppress(Exception):
                    await publish_progress(self._publisher, account=self.account,
                                           run_id=covered, event="run-failed",
                                           fields={"service": self.service, "error": str(exc)})
            return "failed"
        self.failures = 0
        await self._update_pending(
            lambda current: [p for p in current if p["run_id"] not in request.covers])
        await last_run(self.service).set(self._store, self.account, datetime.now(UTC))
        return "done"

    async def _holding_lease(self, work: Awaitable[None]) -> None:
        """Run ``work`` while renewing the lease; cancel it if the lease is lost."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self._lease_renew_s)
                if task in done:
                    return task.result()
                if not await self._store.renew_lease(self.lease, self._holder,
                                                     self._lease_ttl_s):
                    raise LeaseLost(self.lease)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _seconds_to_next_scheduled(self) -> float | None:
        if self._configured is None:
            return None
        self._schedule = await effective_schedule(self._store, self.account,
                                                  configured=self._configured)
        now = datetime.now(UTC)
        base = await last_run(self.service).get_or(self._store, self.account, now)
        due = self._schedule.next_run(base)
        if due is None:
            return None
        return max(0.0, (due - now).total_seconds())

    async def _add_scheduled_trigger(self) -> None:
        scheduled = {"run_id": new_run_id(), "emails": [], "reason": "schedule"}
        await self._update_pending(lambda pending: pending or [scheduled])

    def consumer(self, *, connection: Any, dead_letters: DeadLetterer) -> QueueConsumer:
        return QueueConsumer(
            connection=connection, queue=Topology.trigger_queue(self.account, self.service),
            account=self.account, handler=self.handle_triggers, dead_letters=dead_letters,
            prefetch=100, batch_size=100, expected_type="sync-trigger")
