"""``prefsync sync-now ACCOUNT [--wait]``: start a run now and, with --wait, follow it to the end.

The services publish progress events for every run (advisory, on the control exchange). With
--wait this command listens to them and returns once the changes the run read from both sides
are reconciled and written (or dead-lettered), printing what happened.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any, TextIO

import aio_pika
import orjson

from common.config import Config
from common.messaging.amqp import AmqpPublisher, Outgoing, connect
from common.messaging.envelope import Envelope, encode
from common.messaging.publishing import stable_id
from common.messaging.topology import CONTROL_EXCHANGE, Topology
from common.runs import RunTracker, new_run_id
from services.cli.progress import Meter


async def sync_now(*, config: Config, account: str, wait: bool, timeout_s: float,
                   out: TextIO = sys.stdout) -> int:
    """The CLI: returns the exit code (1 when anything failed or the wait timed out)."""
    if not wait:
        run = await request_sync(config=config, account=account)
        print(f"sync of {account} requested (run {run})", file=out)
        return 0
    try:
        with Meter(out=out) as meter:
            summary = await sync_and_wait(config=config, account=account, timeout_s=timeout_s,
                                          on_progress=partial(show_run, meter))
    except RunTimedOut as exc:
        print(f"sync of {account}: not finished after {timeout_s:.0f} s", file=out)
        print(orjson.dumps(exc.summary, option=orjson.OPT_INDENT_2).decode(), file=out)
        return 1
    print(format_summary(account, summary), file=out)
    return 1 if summary["failed"] else 0


class RunTimedOut(TimeoutError):
    def __init__(self, summary: dict[str, Any]) -> None:
        super().__init__("the run did not finish in time")
        self.summary = summary


async def request_sync(*, config: Config, account: str) -> str:
    """Trigger a run of ``account`` and return the trigger's id."""
    return await _trigger(config=config, account=account, follow=None)


async def sync_and_wait(*, config: Config, account: str, timeout_s: float,
                        on_progress: Callable[[RunTracker], None] | None = None
                        ) -> dict[str, Any]:
    """Trigger a run and return its summary once it is finished (``RunTimedOut`` otherwise);
    ``on_progress`` is called after each of its progress events."""
    tracker: dict[str, RunTracker] = {}
    await _trigger(config=config, account=account, follow=(tracker, timeout_s),
                   on_progress=on_progress)
    return tracker["run"].summary()


def show_run(meter: Meter, tracker: RunTracker) -> None:
    """A run's counts so far: changes read, messages reconciled and written (with their
    totals, and so the time left, once known)."""
    counts = tracker.progress()
    meter.update("read", completed=counts["read"], detail="changes")
    meter.update("reconciled", completed=counts["reconciled"], total=counts["reconciled_total"],
                 detail=f"messages, {counts['changes']} changes")
    meter.update("written", completed=counts["written"], total=counts["written_total"],
                 detail="messages")


async def _trigger(*, config: Config, account: str,
                   follow: tuple[dict[str, RunTracker], float] | None,
                   on_progress: Callable[[RunTracker], None] | None = None) -> str:
    config.account(account)  # a ConfigError names an unknown account
    trigger_id = new_run_id()
    connection = await connect(config.broker.url, name=f"prefsync-sync-now-{account}")
    async with connection:
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        if follow is not None:
            channel = await connection.channel()
            exchange = await channel.get_exchange(CONTROL_EXCHANGE, ensure=True)
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await queue.bind(exchange, routing_key=f"{account}.progress.#")

            async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                await events.put(orjson.loads(message.body))
                await message.ack()

            await queue.consume(on_event)
        publisher = await AmqpPublisher.open(connection)
        envelope = Envelope(type="sync-trigger", account=account, source="control",
                            change_id=stable_id("sync-now", trigger_id),
                            origin_time=datetime.now(UTC), changes=(), run_id=trigger_id,
                            extra={"reason": "sync-now"})
        await publisher.publish_many([Outgoing(
            exchange=CONTROL_EXCHANGE, routing_key=Topology.trigger_key(account),
            body=encode(envelope), message_id=envelope.change_id)])
        if follow is None:
            return trigger_id
        trackers, timeout_s = follow
        tracker = trackers["run"] = RunTracker(trigger_id=trigger_id)
        try:
            async with asyncio.timeout(timeout_s):
                while not tracker.finished:
                    tracker.feed(await events.get())
                    if on_progress is not None:
                        on_progress(tracker)
        except TimeoutError:
            raise RunTimedOut(tracker.summary()) from None
        return trigger_id


def format_summary(account: str, summary: dict[str, Any]) -> str:
    read = summary["read"]
    outcomes = summary["outcomes"]
    lines = [
        f"sync of {account} finished (run {summary['run']})",
        f"  read: {read.get('dynamics', 0)} from Dynamics, {read.get('dotdigital', 0)} from dotdigital",
        f"  applied: {summary['applied_to_dotdigital']} to dotdigital, "
        f"{summary['applied_to_dynamics']} to Dynamics",
        f"  stale: {outcomes.get('stale', 0) + outcomes.get('tie_opt_in_lost', 0)}, "
        f"echoes: {outcomes.get('echo', 0)}, suppressed: {outcomes.get('suppressed', 0)}, "
        f"ineligible: {outcomes.get('ineligible', 0)}",
        f"  failed: {summary['failed']}",
    ]
    lines += [f"  error: {e}" for e in summary["errors"]]
    return "\n".join(lines)
