"""Per-account sync schedules that change without a restart.

An account's schedule comes from its config (``schedule = "..."``, ``manual`` by default) unless
``prefsync schedule ACCOUNT "<schedule>"`` stored an override in the ledger store, where every
replica of the dynamics-poller reads it. The command (:mod:`services.cli.schedule`) also sends
the dynamics-poller a wake-up (a sync trigger with reason ``schedule-changed``, which starts no
run), so the new schedule takes effect at once; a replica that did not get the wake-up reads it
within its regular look at the store.
"""

from __future__ import annotations

from datetime import UTC, datetime

from common.schedule import Schedule, parse_schedule
from common.store.checkpoints import SCHEDULE
from common.store.checkpoints import last_run as last_run_of
from common.store.interface import Checkpoints

# the poller whose runs the schedule starts
SCHEDULED_SERVICE = "dynamics-poller"
SCHEDULE_CHANGED = "schedule-changed"


async def stored_schedule(store: Checkpoints, account: str) -> str | None:
    """The override set with ``prefsync schedule`` (``None``: the config's schedule applies)."""
    return await SCHEDULE.get(store, account)


async def effective_schedule(store: Checkpoints, account: str, *, configured: str) -> Schedule:
    """The schedule in force: the stored override, else the configured one. A stored value
    that no longer parses (written by hand) falls back to the configured one."""
    override = await stored_schedule(store, account)
    if override is not None:
        try:
            return parse_schedule(override)
        except ValueError:
            pass
    return parse_schedule(configured)


async def set_schedule(store: Checkpoints, account: str, text: str | None) -> Schedule | None:
    """Store an override (validated; ``ValueError`` names the problem), or clear it with
    ``None``. Returns the parsed override."""
    if text is None:
        await SCHEDULE.clear(store, account)
        return None
    schedule = parse_schedule(text)
    await SCHEDULE.set(store, account, str(schedule))
    return schedule


async def last_run(store: Checkpoints, account: str) -> datetime | None:
    return await last_run_of(SCHEDULED_SERVICE).get(store, account)


async def next_run(store: Checkpoints, account: str, *, configured: str,
                   now: datetime | None = None) -> datetime | None:
    """When the schedule starts the next run (``None`` for ``manual``); a run that is overdue
    starts as soon as the dynamics-poller looks, so it shows as ``now``."""
    schedule = await effective_schedule(store, account, configured=configured)
    now = now or datetime.now(UTC)
    due = schedule.next_run(await last_run(store, account) or now)
    return None if due is None else max(due, now)
