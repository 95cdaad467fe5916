"""``prefsync replay ACCOUNT --since TIME [--until TIME] [--dry-run]``: feed logged changes again.

Every change message is also appended to the account's changes log (a RabbitMQ stream, kept
``[broker] changes_log_max_age``, 7 days by default). A replay reads the log from ``--since``
(the stream attaches at the chunk holding that arrival time, so earlier messages are skipped by
their timestamp) until a message's timestamp passes ``--until``, or the end: before reading, the
replay appends a small end mark only the log is bound to, and stops when it reads it back, so
its own republished messages are never read again.

What is fed, and why it is safe:

- preference and contact-status changes are republished to the changes exchange with their
  **original source** and unchanged contents. The reconciler takes the side from the source, and
  each change keeps the vendor's own change time and row version, so last-writer-wins compares
  exactly as it did the first time, and our own writes read back are recognised as echoes by
  the version or clock window the ledger recorded for them. A change older than what the
  ledger holds is stale, one it already holds is a duplicate: replaying is idempotent.
- read markers (the end of a complete dotdigital feed read) are held back and fed once, after
  every change of the window: a marker releases the dotdigital writes the reconciler deferred
  until it knew what dotdigital holds, and fed in its place it would release them while later
  changes of the window (dotdigital's own among them) were still unread. A marker is fed only
  when its read's changes are in the window (a read that began before ``--since`` is not).
- replayed messages get new ids (derived from the original id, so a replay repeats its own
  ids), the header ``x-prefsync-replayed-from`` and the replay's run id, so the command can
  follow them through the reconciler and writer and report what changed. They are logged like
  any change; a later replay skips such a copy when its original is in its window too.

Rebuilding a lost ledger: the log carries the observations but not what our writes produced, so
a read-back of a write made in the window counts as a change on that side with the value we
wrote. The values come back right; a register may carry the read-back's time instead of the
original change's (see README, Operations).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from common.config import Config
from common.messaging.amqp import AmqpPublisher, Outgoing, connect
from common.messaging.envelope import Envelope, MalformedMessage, ReadComplete, decode
from common.messaging.publishing import POLLED_AT, envelopes_by_shard, read_markers, stable_id
from common.messaging.topology import CHANGES_EXCHANGE, CONTROL_EXCHANGE, Topology
from common.runs import RunTracker, new_run_id
from services.cli.progress import Meter

FED_TYPES = frozenset({"preference-changes", "contact-status-changes"})
PUBLISH_BATCH = 256
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class ReplayError(RuntimeError):
    pass


def parse_when(text: str, *, now: datetime | None = None) -> datetime:
    """ISO 8601 (no zone: UTC) or a duration ago: ``90s``, ``15m``, ``2h``, ``3d``, ``1w``."""
    now = now or datetime.now(UTC)
    value = text.strip()
    relative = _RELATIVE.match(value)
    if relative:
        return now - timedelta(seconds=float(relative.group(1)) * _UNIT_S[relative.group(2)])
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ReplayError(f"{text!r} is neither an ISO 8601 time nor a duration like 2h or "
                          "3d") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


@dataclass
class ReplayTracker(RunTracker):
    """Follows the replay's own messages through the reconciler and the writer."""

    expected: set[str] = field(default_factory=set)
    # the expected messages not reconciled yet, kept as events arrive (a constant cost per
    # event), worked out again when more are expected
    _missing: set[str] = field(default_factory=set, repr=False)
    _missing_of: int = field(default=-1, repr=False)

    def feed(self, event: dict[str, Any]) -> None:
        super().feed(event)
        if event.get("event") == "reconciled" and str(event.get("message")) in self.reconciled:
            self._missing.discard(str(event.get("message")))

    @property
    def finished(self) -> bool:
        if self._missing_of != len(self.expected):
            self._missing = self.expected - self.reconciled.keys()
            self._missing_of = len(self.expected)
        return not self._missing and self.all_written


@dataclass
class ReplayReport:
    account: str
    run_id: str
    since: datetime
    until: datetime | None
    dry_run: bool
    read: int = 0                      # messages of the window read from the log
    fed: int = 0                       # messages published again
    changes: Counter[str] = field(default_factory=Counter)   # by source
    skipped: Counter[str] = field(default_factory=Counter)   # by why
    first_at: datetime | None = None
    last_at: datetime | None = None
    # complete dotdigital reads seen in the window: preference id -> when that read started
    reads: dict[int, datetime] = field(default_factory=dict)
    # ids of the messages read so far (a copy whose original was read is not fed again)
    seen: set[str] = field(default_factory=set)
    summary: dict[str, Any] | None = None                    # what the services did with it
    finished: bool = True


async def _log_messages(connection: AbstractRobustConnection, *, account: str,
                        since: datetime, prefetch: int
                        ) -> AsyncGenerator[AbstractIncomingMessage, None]:
    """The account's changes log from ``since`` (a chunk early, at most), acked as read."""
    channel = await connection.channel()
    try:
        await channel.set_qos(prefetch_count=prefetch)  # a stream consumer needs it set first
        try:
            queue = await channel.declare_queue(Topology.changes_log(account), passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            raise ReplayError(f"{account} has no changes log yet (start a service once to "
                              "declare it)") from None
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        tag = await queue.consume(inbox.put, no_ack=False,
                                  arguments={"x-stream-offset": since})
        try:
            while True:
                message = await inbox.get()
                await message.ack()  # on a stream an ack is credit, not removal
                yield message
        finally:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


def refeed(envelope: Envelope, *, original_id: str, run_id: str,
           shards: int, polled_at: object = None) -> list[Outgoing]:
    """The same changes, same source, for the current shard count; ids derived from the original.
    ``polled_at``: the original's read time (its header), kept: a change stamped beyond the
    future bound counts as made when it was first read, not when it is replayed."""
    outgoing = envelopes_by_shard(
        account=envelope.account, source=envelope.source, type=envelope.type,
        changes=envelope.changes, shards=shards, run_id=run_id,
        id_seed=f"replay:{original_id}")
    headers: dict[str, Any] = {"x-prefsync-replayed-from": original_id}
    if polled_at is not None:
        headers[POLLED_AT] = polled_at
    return [replace(o, headers=headers) for o in outgoing]


async def replay(*, config: Config, account: str, since: datetime, until: datetime | None = None,
                 dry_run: bool = False, wait: bool = True, timeout_s: float = 600.0,
                 out: TextIO = sys.stdout, progress: TextIO | None = None) -> ReplayReport:
    """``progress``: where progress is drawn, on a terminal only (default: ``out``; never
    with ``dry_run``, whose lines go to ``out``)."""
    config.account(account)  # a ConfigError names an unknown account
    run_id = f"replay-{new_run_id()}"
    report = ReplayReport(account=account, run_id=run_id, since=since, until=until,
                          dry_run=dry_run)
    follow = wait and not dry_run
    connection = await connect(config.broker.url, name=f"prefsync-replay-{account}")
    meter = Meter(out=progress or out, enabled=not dry_run)
    async with connection:
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        if follow:
            await _listen(connection, account=account, run_id=run_id, events=events)
        publisher = await AmqpPublisher.open(connection)
        end_mark = stable_id("replay-end", run_id)
        await publisher.publish_many([Outgoing(
            exchange=CHANGES_EXCHANGE, routing_key=Topology.changes_log_mark_key(account),
            body=orjson.dumps({"replay": run_id}), message_id=end_mark)])
        tracker = ReplayTracker(trigger_id=run_id, run_id=run_id)
        pending: list[Outgoing] = []
        shown = _Progress(report, meter)
        floor = since.replace(microsecond=0)  # message timestamps have whole seconds
        reading = contextlib.aclosing(_log_messages(connection, account=account, since=since,
                                                prefetch=config.broker.prefetch))
        with meter:
            async with reading as log_messages:
                await _read(log_messages, report=report, end_mark=end_mark, floor=floor,
                            pending=pending, tracker=tracker, publisher=publisher,
                            shown=shown, shards=config.broker.shards, out=out)
            await _finish(report, pending=pending, tracker=tracker, publisher=publisher,
                          shown=shown, shards=config.broker.shards, out=out)
            if follow and tracker.expected:
                report.finished = await _follow(tracker, events, timeout_s=timeout_s,
                                                meter=meter)
                report.summary = tracker.summary()
        await publisher.close()
    return report


async def _finish(report: ReplayReport, *, pending: list[Outgoing], tracker: ReplayTracker,
                  publisher: AmqpPublisher, shown: _Progress, shards: int, out: TextIO) -> None:
    """Feed the held read markers after the window's changes, and what is left to publish."""
    markers = _held_markers(report, shards=shards)
    report.fed += len(markers)
    if report.dry_run:
        for marker in markers:
            print(f"would feed {marker.message_id}  (end of the window)  read marker "
                  f"{marker.routing_key}", file=out)
    else:
        pending += markers
        tracker.expected.update(o.message_id for o in markers)
    if pending:
        await publisher.publish_many(pending)
    shown.done()


async def _read(log_messages: AsyncIterator[AbstractIncomingMessage], *, report: ReplayReport,
                end_mark: str, floor: datetime, pending: list[Outgoing], tracker: ReplayTracker,
                publisher: AmqpPublisher, shown: _Progress, shards: int, out: TextIO) -> None:
    account, until, dry_run = report.account, report.until, report.dry_run
    async for message in log_messages:
        if message.message_id == end_mark:
            break
        if message.routing_key == Topology.changes_log_mark_key(account):
            continue  # another replay's end mark
        stamp = message.timestamp
        if stamp is not None and stamp < floor:
            continue
        if until is not None and stamp is not None and stamp > until:
            break
        report.read += 1
        report.first_at = report.first_at or stamp
        report.last_at = stamp or report.last_at
        batch = _feed(message, report=report, run_id=report.run_id, shards=shards,
                      out=out if dry_run else None)
        if not dry_run:
            pending.extend(batch)
            tracker.expected.update(o.message_id for o in batch)
            if len(pending) >= PUBLISH_BATCH:
                await publisher.publish_many(pending)
                pending.clear()
        shown.maybe()


def _feed(message: AbstractIncomingMessage, *, report: ReplayReport, run_id: str, shards: int,
          out: TextIO | None) -> list[Outgoing]:
    try:
        envelope = decode(message.body)
    except MalformedMessage:
        report.skipped["malformed"] += 1
        return []
    if envelope.account != report.account:
        report.skipped["other account"] += 1
        return []
    if envelope.type == "read-markers":
        _hold_marker(envelope, report)
        return []
    if envelope.type not in FED_TYPES:
        report.skipped[envelope.type] += 1
        return []
    original = message.message_id or envelope.change_id
    copy_of = (message.headers or {}).get("x-prefsync-replayed-from")
    if isinstance(copy_of, str) and copy_of in report.seen:
        report.skipped["copies from earlier replays"] += 1
        return []
    report.seen.add(original)
    if isinstance(copy_of, str):
        report.seen.add(copy_of)
    outgoing = refeed(envelope, original_id=original, run_id=run_id, shards=shards,
                      polled_at=(message.headers or {}).get(POLLED_AT))
    report.fed += len(outgoing)
    report.changes[envelope.source] += len(envelope.changes)
    if out is not None:
        stamp = message.timestamp.isoformat() if message.timestamp else "?"
        for item in outgoing:
            print(f"would feed {item.message_id}  {stamp}  {envelope.source:<10} "
                  f"{envelope.type:<22} {item.routing_key}  (from {original}, "
                  f"{len(envelope.changes)} change(s))", file=out)
    return outgoing


def _hold_marker(envelope: Envelope, report: ReplayReport) -> None:
    for change in envelope.changes:
        if not isinstance(change, ReadComplete):
            continue
        if change.origin_time < report.since:
            report.skipped["read-markers of reads begun before --since"] += 1
            continue
        newest = report.reads.get(change.preference_id)
        if newest is None or change.origin_time > newest:
            report.reads[change.preference_id] = change.origin_time


def _held_markers(report: ReplayReport, *, shards: int) -> list[Outgoing]:
    """One marker per shard for each complete read in the window, after everything else."""
    out: list[Outgoing] = []
    for preference_id, started in sorted(report.reads.items()):
        out += read_markers(account=report.account, preference_id=preference_id,
                            started=started, shards=shards, run_id=report.run_id,
                            id_seed=f"replay:{preference_id}:{started.isoformat()}")
    return out


async def _listen(connection: AbstractRobustConnection, *, account: str, run_id: str,
                  events: asyncio.Queue[dict[str, Any]]) -> None:
    channel = await connection.channel()
    exchange = await channel.get_exchange(CONTROL_EXCHANGE, ensure=True)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, routing_key=Topology.progress_key(account, run_id))

    async def on_event(message: AbstractIncomingMessage) -> None:
        await events.put(orjson.loads(message.body))
        await message.ack()

    await queue.consume(on_event)


async def _follow(tracker: ReplayTracker, events: asyncio.Queue[dict[str, Any]], *,
                  timeout_s: float, meter: Meter) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            while not tracker.finished:
                tracker.feed(await events.get())
                reconciled = len(tracker.reconciled)
                meter.update("reconciled", completed=reconciled, total=len(tracker.expected),
                             detail="messages")
                meter.update("written", completed=len(tracker.written),
                             total=(tracker.named_writes if reconciled >= len(tracker.expected)
                                    else None), detail="messages")
    except TimeoutError:
        return False
    return True


class _Progress:
    """How far the replay has read into its window (on a terminal only, see ``Meter``)."""

    def __init__(self, report: ReplayReport, meter: Meter,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._report = report
        self._meter = meter
        # the window in seconds: to --until, or to now (the end of the log)
        self._total = max(1.0, ((report.until or clock()) - report.since).total_seconds())

    def maybe(self) -> None:
        r = self._report
        into = (r.last_at - r.since).total_seconds() if r.last_at else 0.0
        self._meter.update("read", completed=min(self._total, max(0.0, into)),
                           total=self._total,
                           detail=f"s of the window; {r.read} messages read, {r.fed} fed")

    def done(self) -> None:
        self._meter.update("read", completed=self._total)


def format_report(report: ReplayReport) -> str:
    window = f"{report.since.isoformat()} to {report.until.isoformat() if report.until else 'now'}"
    verb = "would feed" if report.dry_run else "fed"
    lines = [
        f"replay of {report.account} ({report.run_id}), {window}",
        f"  read {report.read} message(s) from the changes log; {verb} {report.fed} "
        f"({report.changes.get('dynamics', 0)} change(s) from Dynamics, "
        f"{report.changes.get('dotdigital', 0)} from dotdigital)",
    ]
    if report.reads:
        lines.append(f"  complete dotdigital reads in the window: {len(report.reads)} preference(s) "
                     "(their read markers were fed last)")
    if report.skipped:
        lines.append("  not fed: " + ", ".join(f"{n} {why}" for why, n in
                                               sorted(report.skipped.items())))
    if report.first_at is not None and report.first_at > report.since + timedelta(minutes=1):
        lines.append(f"  note: the log starts at {report.first_at.isoformat()}; anything "
                     "earlier is past its retention")
    summary = report.summary
    if summary is not None:
        outcomes = summary["outcomes"]
        lines += [
            "  reconciled: " + (", ".join(f"{k} {v}" for k, v in outcomes.items()) or "nothing"),
            f"  changed: {summary['applied_to_dotdigital']} written to dotdigital, "
            f"{summary['applied_to_dynamics']} to Dynamics; failed {summary['failed']}",
        ]
        if not report.finished:
            lines.append("  not finished in time: the services are still working on it (or "
                         "are not running)")
    elif not report.dry_run and report.fed:
        lines.append("  (not followed: see the services' metrics and history)")
    return "\n".join(lines)


async def replay_command(*, config: Config, account: str, since: str, until: str | None,
                         dry_run: bool, wait: bool, timeout_s: float,
                         out: TextIO = sys.stdout) -> int:
    try:
        start = parse_when(since)
        end = parse_when(until) if until else None
    except ReplayError as exc:
        print(f"prefsync replay: {exc}", file=out)
        return 2
    if end is not None and end < start:
        print("prefsync replay: --until is before --since", file=out)
        return 2
    try:
        report = await replay(config=config, account=account, since=start, until=end,
                              dry_run=dry_run, wait=wait, timeout_s=timeout_s, out=out)
    except ReplayError as exc:
        print(f"prefsync replay: {exc}", file=out)
        return 1
    print(format_report(report), file=out)
    failed = bool(report.summary and report.summary["failed"])
    return 1 if failed or not report.finished else 0
