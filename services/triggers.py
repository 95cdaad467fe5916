"""When a poller runs: triggers from the control queue and the account's schedule, coalesced.

A trigger is recorded in the store and acked at once (a run can outlast the broker's consumer
timeout); the run loop then takes every pending trigger and makes one run of them, so a trigger
that arrives during a run is coalesced into the next run, never lost. A run left unfinished by a
crash is pending again at start-up.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from common.broker import DeadLetterer, Delivery, Publisher, QueueConsumer
from common.messages import EligibleContact
from common.schedule import Schedule, parse_schedule
from common.topology import Topology
from services.publishing import publish_progress

log = logging.getLogger("prefsync.triggers")


@dataclass(frozen=True, kw_only=True)
class RunRequest:
    run_id: str
    covers: tuple[str, ...]
    eligible_emails: tuple[str, ...] = ()
    reasons: tuple[str, ...] = field(default_factory=tuple)


class CheckpointStore:
    """What the coordinator needs of the ledger store."""

    async def get_checkpoint(self, account: str, source: str) -> str | None: ...

    async def set_checkpoint(self, account: str, source: str, value: str) -> None: ...


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


class RunCoordinator:
    def __init__(self, *, service: str, account: str, store: Any, publisher: Publisher,
                 run_cycle: Callable[[RunRequest], Awaitable[None]],
                 schedule: str | None = None) -> None:
        self.service = service
        self.account = account
        self._store = store
        self._publisher = publisher
        self._run_cycle = run_cycle
        self._schedule: Schedule | None = parse_schedule(schedule) if schedule else None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self.idle = asyncio.Event()

    @property
    def _pending_key(self) -> str:
        return f"{self.service}:pending"

    async def handle_triggers(self, batch: Sequence[Delivery]) -> None:
        """Queue handler: remember the triggers durably, then they are acked."""
        async with self._lock:
            pending = await self._load_pending()
            for delivery in batch:
                env = delivery.envelope
                pending.append({
                    "run_id": env.run_id or env.change_id,
                    "emails": [c.email for c in env.changes if isinstance(c, EligibleContact)],
                    "reason": str(env.extra.get("reason", "")),
                })
            await self._save_pending(pending)
        self._wake.set()

    async def _load_pending(self) -> list[dict[str, Any]]:
        raw = await self._store.get_checkpoint(self.account, self._pending_key)
        return list(orjson.loads(raw)) if raw else []

    async def _save_pending(self, pending: list[dict[str, Any]]) -> None:
        await self._store.set_checkpoint(self.account, self._pending_key,
                                         orjson.dumps(pending).decode())

    async def run_loop(self) -> None:
        self._wake.set()  # look for runs left pending by an earlier process
        while True:
            timeout = await self._seconds_to_next_scheduled()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)
            except TimeoutError:
                await self._add_scheduled_trigger()
            self._wake.clear()
            async with self._lock:
                pending = await self._load_pending()
            if not pending:
                self.idle.set()
                continue
            self.idle.clear()
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
                await self._run_cycle(request)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("sync run failed", extra={"account": self.account,
                                                        "service": self.service})
                for covered in request.covers:
                    await publish_progress(self._publisher, account=self.account,
                                           run_id=covered, event="run-failed",
                                           fields={"service": self.service, "error": str(exc)})
            async with self._lock:
                remaining = [p for p in await self._load_pending()
                             if p["run_id"] not in request.covers]
                await self._save_pending(remaining)
                await self._store.set_checkpoint(self.account, f"{self.service}:last-run",
                                                 datetime.now(UTC).isoformat())
            if remaining:
                self._wake.set()
            else:
                self.idle.set()

    async def _seconds_to_next_scheduled(self) -> float | None:
        if self._schedule is None:
            return None
        last = await self._store.get_checkpoint(self.account, f"{self.service}:last-run")
        now = datetime.now(UTC)
        base = datetime.fromisoformat(last) if last else now
        due = self._schedule.next_run(base)
        if due is None:
            return None
        return max(0.0, (due - now).total_seconds())

    async def _add_scheduled_trigger(self) -> None:
        async with self._lock:
            pending = await self._load_pending()
            if not pending:
                pending.append({"run_id": new_run_id(), "emails": [], "reason": "schedule"})
                await self._save_pending(pending)

    def consumer(self, *, connection: Any, dead_letters: DeadLetterer) -> QueueConsumer:
        return QueueConsumer(
            connection=connection, queue=Topology.trigger_queue(self.account, self.service),
            account=self.account, handler=self.handle_triggers, dead_letters=dead_letters,
            prefetch=100, batch_size=100, expected_type="sync-trigger")
