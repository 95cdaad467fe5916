"""Per-account sync schedules that change without a restart.

An account's schedule comes from its config (``schedule = "..."``, ``manual`` by default) unless
``prefsync schedule ACCOUNT "<schedule>"`` stored an override in the ledger store, where every
replica of the dynamics-poller reads it. The command also sends the dynamics-poller a wake-up
(a sync trigger with reason ``schedule-changed``, which starts no run), so the new schedule
takes effect at once; a replica that did not get the wake-up reads it within its regular look
at the store.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from common import messages
from common.broker import AmqpPublisher, Outgoing, connect
from common.config import Config
from common.messages import Envelope
from common.schedule import Schedule, parse_schedule
from common.topology import CONTROL_EXCHANGE, Topology
from services.broker_setup import account_broker_url
from services.publishing import stable_id

SCHEDULE_CHECKPOINT = "schedule"
LAST_RUN_CHECKPOINT = "dynamics-poller:last-run"
SCHEDULE_CHANGED = "schedule-changed"


async def stored_schedule(store: Any, account: str) -> str | None:
    """The override set with ``prefsync schedule`` (``None``: the config's schedule applies)."""
    value: str | None = await store.get_checkpoint(account, SCHEDULE_CHECKPOINT)
    return value or None


async def effective_schedule(store: Any, account: str, *, configured: str) -> Schedule:
    """The schedule in force: the stored override, else the configured one. A stored value
    that no longer parses (written by hand) falls back to the configured one."""
    override = await stored_schedule(store, account)
    if override is not None:
        try:
            return parse_schedule(override)
        except ValueError:
            pass
    return parse_schedule(configured)


async def set_schedule(store: Any, account: str, text: str | None) -> Schedule | None:
    """Store an override (validated; ``ValueError`` names the problem), or clear it with
    ``None``. Returns the parsed override."""
    if text is None:
        await store.set_checkpoint(account, SCHEDULE_CHECKPOINT, "")
        return None
    schedule = parse_schedule(text)
    await store.set_checkpoint(account, SCHEDULE_CHECKPOINT, str(schedule))
    return schedule


async def last_run(store: Any, account: str) -> datetime | None:
    raw: str | None = await store.get_checkpoint(account, LAST_RUN_CHECKPOINT)
    return datetime.fromisoformat(raw) if raw else None


async def next_run(store: Any, account: str, *, configured: str,
                   now: datetime | None = None) -> datetime | None:
    """When the schedule starts the next run (``None`` for ``manual``); a run that is overdue
    starts as soon as the dynamics-poller looks, so it shows as ``now``."""
    schedule = await effective_schedule(store, account, configured=configured)
    now = now or datetime.now(UTC)
    due = schedule.next_run(await last_run(store, account) or now)
    return None if due is None else max(due, now)


async def wake_dynamics_poller(*, config: Config, account: str) -> None:
    """Tell the account's dynamics-poller to read its schedule again now."""
    account_config = config.account(account)
    connection = await connect(account_broker_url(config.broker.url, account_config),
                               name=f"prefsync-schedule-{account}")
    async with connection:
        publisher = await AmqpPublisher.open(connection)
        now = datetime.now(UTC)
        envelope = Envelope(type="sync-trigger", account=account, source="control",
                            change_id=stable_id("schedule", account, now.isoformat()),
                            origin_time=now, changes=(), extra={"reason": SCHEDULE_CHANGED})
        await publisher.publish_many([Outgoing(
            exchange=CONTROL_EXCHANGE, routing_key=Topology.trigger_key(account),
            body=messages.encode(envelope), message_id=envelope.change_id)])


async def schedule_command(*, config: Config, account: str, text: str | None, clear: bool,
                           out: TextIO = sys.stdout) -> int:
    """``prefsync schedule ACCOUNT [SCHEDULE | --clear]``: show, set or clear the override."""
    from common.store import open_store

    configured = config.account(account).schedule
    async with open_store(config.store.url) as store:
        if text is not None or clear:
            try:
                await set_schedule(store, account, None if clear else text)
            except ValueError as exc:
                print(f"prefsync: {exc}", file=sys.stderr)
                return 2
        override = await stored_schedule(store, account)
        in_force = await effective_schedule(store, account, configured=configured)
        due = await next_run(store, account, configured=configured)
    if text is not None or clear:
        await wake_dynamics_poller(config=config, account=account)
    source = "set with prefsync schedule" if override else "from the config"
    print(f"{account}: {in_force} ({source}); next run: "
          f"{due.isoformat() if due else 'only when started (sync-now)'}", file=out)
    return 0
