"""``prefsync schedule ACCOUNT [SCHEDULE | --clear]``: show, set or clear an account's schedule.

The override is kept in the ledger store (:mod:`services.runtime.schedules`); a change also
wakes the account's dynamics-poller so that it takes effect at once.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TextIO

from common.config import Config
from common.messaging.amqp import AmqpPublisher, Outgoing, account_broker_url, connect
from common.messaging.envelope import Envelope, encode
from common.messaging.publishing import stable_id
from common.messaging.topology import CONTROL_EXCHANGE, Topology
from services.runtime.schedules import (
    SCHEDULE_CHANGED,
    effective_schedule,
    next_run,
    set_schedule,
    stored_schedule,
)


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
            body=encode(envelope), message_id=envelope.change_id)])


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
