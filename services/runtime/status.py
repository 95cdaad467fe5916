"""Each account's sync status: none, added to queue, synchronising, then the last run's outcome.

The dynamics-poller service follows its account's run progress events (the same ones
``sync-now --wait`` follows) and keeps the status in the ledger store, so ``prefsync status``
and the HTTP API read it from there whatever process asks:

- a run is *synchronising* from the dynamics-poller's ``run-started`` until what the run read
  from both sides is reconciled and written (or a poller reports ``run-failed``);
- then the run's counts (read, applied each way, stale, echoes, suppressed, ineligible, failed)
  and its finish time are kept as the last run, and the finish time as the last success when
  nothing failed.

Triggers waiting for the poller (``dynamics-poller:pending``) show as *added to queue*; the next
scheduled run comes from the account's schedule (:mod:`services.runtime.schedules`).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import orjson
from aio_pika.abc import AbstractRobustConnection

from common.messaging.amqp import while_broker_returns
from common.messaging.breakers import RetryPolicy
from common.messaging.topology import CONTROL_EXCHANGE
from common.runs import FollowedRuns, RunTracker
from common.store.checkpoints import STATUS, pending_runs
from common.store.interface import Checkpoints
from common.vendors.clock_skew import clock_status
from services.runtime.schedules import SCHEDULED_SERVICE, effective_schedule, next_run

log = logging.getLogger("prefsync.status")

# runs followed at once (a run whose events were lost is forgotten after this many newer ones)
MAX_FOLLOWED_RUNS = 20


def run_counts(tracker: RunTracker) -> dict[str, int]:
    """The counts of a run from its progress events."""
    outcomes: Counter[str] = Counter()
    for event in tracker.reconciled.values():
        outcomes.update(event.get("outcomes", {}))
    written: Counter[str] = Counter()
    for event in tracker.written.values():
        side = str(event.get("side"))
        written[f"applied_to_{side}"] += int(event.get("written", 0))
        written["failed"] += int(event.get("failed", 0))
        written["suppressed"] += int(event.get("suppressed", 0))
    dynamics = tracker.pollers_done.get("dynamics", {})
    dotdigital = tracker.pollers_done.get("dotdigital", {})
    return {
        "read_dynamics": int(dynamics.get("read", 0)),
        "read_dotdigital": int(dotdigital.get("read", 0)),
        "applied_to_dotdigital": written["applied_to_dotdigital"],
        "applied_to_dynamics": written["applied_to_dynamics"],
        "stale": outcomes["stale"] + outcomes["tie_opt_in_lost"],
        "echoes": outcomes["echo"],
        "suppressed": outcomes["suppressed"] + written["suppressed"],
        # Dynamics rows of ineligible records never reach the reconciler: the poller counts them
        "ineligible": outcomes["ineligible"] + int(dynamics.get("ineligible", 0)),
        "failed": written["failed"] + len(tracker.failures),
    }


def _now() -> str:
    return datetime.now(UTC).isoformat()


async def load_status(store: Checkpoints, account: str) -> dict[str, Any]:
    return await STATUS.get_or(store, account, {})


async def _save_status(store: Checkpoints, account: str, status: dict[str, Any]) -> None:
    await STATUS.set(store, account, status)


class RunStatusRecorder:
    """Follows one account's progress events and keeps its status in the store."""

    def __init__(self, *, account: str, store: Checkpoints) -> None:
        self.account = account
        self._store = store
        self._runs = FollowedRuns(limit=MAX_FOLLOWED_RUNS)
        self._started: dict[str, str] = {}

    async def feed(self, event: dict[str, Any]) -> None:
        started, finished = self._runs.feed(event)
        if started is not None:
            self._started[started] = _now()
            # runs forgotten unfinished (events of old runs that never ended)
            for run in [r for r in self._started if r not in self._runs.runs]:
                del self._started[run]
            status = await load_status(self._store, self.account)
            status["current"] = {"run": started, "started_at": self._started[started]}
            await _save_status(self._store, self.account, status)
        for run, tracker in finished:
            await self._finish(run, tracker)

    async def _finish(self, run: str, tracker: RunTracker) -> None:
        counts = run_counts(tracker)
        finished = _now()
        ok = not counts["failed"]
        status = await load_status(self._store, self.account)
        current = status.get("current") or {}
        if current.get("run") == run:
            status["current"] = None
        status["last"] = {"run": run, "started_at": self._started.pop(run, None),
                          "finished_at": finished, "ok": ok, "counts": counts,
                          "errors": tracker.failures[:10]}
        if ok:
            status["last_success_at"] = finished
        await _save_status(self._store, self.account, status)
        log.info("sync run finished", extra={"account": self.account, "run": run, "ok": ok,
                                             **counts})

    async def run(self, connection: AbstractRobustConnection, *,
                  retry: RetryPolicy | None = None) -> None:
        """Consume the account's progress events until cancelled; a lost broker connection
        (a restart, connections closed) is waited out and the events followed again."""
        while True:  # a follow that ends (its queue went with a channel) starts again
            await while_broker_returns(lambda: self._follow(connection), connection=connection,
                                       what=f"progress events of {self.account}", retry=retry)

    async def _follow(self, connection: AbstractRobustConnection) -> None:
        channel = await connection.channel()
        try:
            exchange = await channel.get_exchange(CONTROL_EXCHANGE, ensure=True)
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await queue.bind(exchange, routing_key=f"{self.account}.progress.#")
            # advisory events on a queue of this process's own: no acks to lose with a channel
            async with queue.iterator(no_ack=True) as messages:
                async for message in messages:
                    try:
                        event = orjson.loads(message.body)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(event, dict):
                        await self.feed(event)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()


async def account_status(store: Checkpoints, *, account: str, schedule: str) -> dict[str, Any]:
    """The status of one account as the ``status`` command and the HTTP API show it."""
    stored = await load_status(store, account)
    pending = await pending_runs(SCHEDULED_SERVICE).get_or(store, account, [])
    current = stored.get("current")
    last = stored.get("last")
    queued = [p for p in pending if not current or p.get("run_id") != current.get("run")]
    if current:
        state = "Synchronising"
    elif queued:
        state = "Added to queue"
    elif not last:
        state = "None"
    else:
        state = "Synchronised" if last.get("ok") else "Failed"
    due = await next_run(store, account, configured=schedule)
    in_force = await effective_schedule(store, account, configured=schedule)
    return {
        "account": account,
        "state": state,
        "queued": len(queued),
        "current_run": current,
        "last_run": last,
        "last_success_at": stored.get("last_success_at"),
        "schedule": str(in_force),
        "next_run_at": due.isoformat() if due else None,
        "clocks": await clock_status(store, account=account),
    }


def format_status(status: dict[str, Any]) -> str:
    lines = [f"{status['account']}: {status['state']}"]
    if status["current_run"]:
        lines.append(f"  running: {status['current_run']['run']} "
                     f"(since {status['current_run']['started_at']})")
    if status["queued"]:
        lines.append(f"  queued: {status['queued']} trigger(s)")
    lines.append(f"  last success: {status['last_success_at'] or 'never'}")
    lines.append(f"  schedule: {status['schedule']}; next run: "
                 f"{status['next_run_at'] or 'only when started (sync-now)'}")
    for side, clock in (status.get("clocks") or {}).items():
        name = "Dynamics" if side == "dynamics" else "dotdigital"
        if clock is None:
            lines.append(f"  {name} clock: not measured yet")
            continue
        lines.append(f"  {name} clock: {clock['offset_s']:+.3f} s from ours "
                     f"(± {clock['uncertainty_s']:.3f} s, {clock['samples']} sample(s), "
                     f"measured {clock['measured_at']})"
                     + (f"; {clock['suspects']} disagreeing sample(s)"
                        if clock["suspects"] else ""))
    last = status["last_run"]
    if last:
        c = last["counts"]
        lines += [
            f"  last run: {last['run']} finished {last['finished_at']}"
            f"{'' if last['ok'] else ' with failures'}",
            f"    read: {c['read_dynamics']} from Dynamics, {c['read_dotdigital']} from dotdigital",
            f"    applied: {c['applied_to_dotdigital']} to dotdigital, "
            f"{c['applied_to_dynamics']} to Dynamics",
            f"    stale: {c['stale']}, echoes: {c['echoes']}, suppressed: {c['suppressed']}, "
            f"ineligible: {c['ineligible']}, failed: {c['failed']}",
        ]
        lines += [f"    error: {e}" for e in last.get("errors", [])]
    return "\n".join(lines)
