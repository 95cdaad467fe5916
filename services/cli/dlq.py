"""``prefsync dlq list|show|replay|purge``: the accounts' dead-letter queues, for operators.

Each entry shows its account, age and reason: ours (``x-prefsync-reason`` / ``-code`` /
``-kind``, set by the services) or the broker's (``x-death``: e.g. ``delivery_limit`` when a
message kept failing). ``replay`` publishes an entry back on its original route
(``x-prefsync-original-exchange`` / ``-routing-key``, else x-death's), ``purge`` removes it.

How the queue is read: a dead-letter queue is a quorum queue, and a get followed by a requeue
would use up a delivery attempt each time (RabbitMQ 4 drops a message after 20 by default, and
a dead-letter queue has nowhere further to send it). So every command walks the entries that
were in the queue when it started, one at a time: an entry it acts on is published where it
goes (or nowhere, for purge) and then acked; every other entry is published again at the tail
of the queue, unchanged but for our own headers that keep the broker's reason readable, and
then acked. The order of the existing entries is kept; entries dead-lettered during the walk
land among them. Nothing is lost if the command dies midway: an entry is acked only after its
copy was confirmed, so at worst one entry appears twice.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from common.config import Config
from common.messaging.amqp import AmqpPublisher, Outgoing, connect
from common.messaging.topology import CHANGES_EXCHANGE, CONTROL_EXCHANGE, WRITES_EXCHANGE, Topology
from services.cli.progress import Meter

Action = Literal["list", "show", "replay", "purge"]
ACTIONS: tuple[Action, ...] = ("list", "show", "replay", "purge")
# Exchanges an entry may be replayed to (the dead exchange would only loop it back).
REPLAYABLE = frozenset({CHANGES_EXCHANGE, WRITES_EXCHANGE, CONTROL_EXCHANGE})
# Headers describing the death; a replayed message starts clean.
_DEATH_HEADERS = ("x-death", "x-first-death-exchange", "x-first-death-queue",
                  "x-first-death-reason", "x-delivery-count", "x-last-death-exchange",
                  "x-last-death-queue", "x-last-death-reason")


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One dead letter, as an operator reads it."""

    account: str
    position: int
    message_id: str
    reason: str          # the category: our kind (malformed, write-dynamics...) or the broker's
    code: str            # the vendor's code, where a vendor refused a write
    detail: str          # the full reason text
    by: Literal["prefsync", "broker"]
    dead_at: datetime | None
    queue: str           # the queue it was taken from when it died
    original_exchange: str
    original_routing_key: str
    headers: Mapping[str, Any] = field(repr=False)
    body: bytes = field(repr=False)

    def age_s(self, now: datetime) -> float | None:
        return None if self.dead_at is None else max(0.0, (now - self.dead_at).total_seconds())

    def matches(self, *, reason: str | None, ids: Sequence[str]) -> bool:
        if ids and self.message_id not in ids:
            return False
        if reason is None:
            return True
        wanted = reason.lower()
        return wanted in (self.reason.lower(), self.code.lower()) or wanted in self.detail.lower()


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value), UTC)
    if isinstance(value, str | bytes):
        try:
            parsed = datetime.fromisoformat(_text(value).replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def describe(*, account: str, position: int, headers: Mapping[str, Any], body: bytes,
             message_id: str, timestamp: datetime | None = None) -> Entry:
    """An entry from a dead letter's headers (pure: no broker)."""
    deaths = headers.get("x-death")
    death: Mapping[str, Any] = deaths[0] if isinstance(deaths, list) and deaths else {}
    keys = death.get("routing-keys") or []
    death_key = _text(keys[0]) if isinstance(keys, list) and keys else ""
    ours = "x-prefsync-kind" in headers and not headers.get("x-prefsync-dead-lettered-by")
    if ours:
        reason = _text(headers.get("x-prefsync-kind")) or "unknown"
        detail = _text(headers.get("x-prefsync-reason"))
    else:
        reason = _text(headers.get("x-prefsync-kind") or death.get("reason")) or "unknown"
        detail = _text(headers.get("x-prefsync-reason")) or (
            f"dead-lettered by the broker ({reason}) from {_text(death.get('queue'))}")
    return Entry(
        account=account, position=position, message_id=message_id, reason=reason,
        code=_text(headers.get("x-prefsync-code")), detail=detail,
        by="prefsync" if ours else "broker",
        dead_at=(_time(headers.get("x-prefsync-dead-at")) or _time(death.get("time"))
                 or timestamp),
        queue=_text(headers.get("x-prefsync-queue") or death.get("queue")),
        original_exchange=_text(headers.get("x-prefsync-original-exchange")
                                or death.get("exchange")),
        original_routing_key=_text(headers.get("x-prefsync-original-routing-key")) or death_key,
        headers=dict(headers), body=body)


def kept_headers(entry: Entry) -> dict[str, Any]:
    """Headers for the copy put back at the tail: the broker's reason kept in our own headers
    (newer brokers do not keep a client-set ``x-death``)."""
    headers = dict(entry.headers)
    if entry.by == "broker":
        headers.update({
            "x-prefsync-dead-lettered-by": "broker",
            "x-prefsync-kind": entry.reason,
            "x-prefsync-reason": entry.detail,
            "x-prefsync-queue": entry.queue,
            "x-prefsync-original-exchange": entry.original_exchange,
            "x-prefsync-original-routing-key": entry.original_routing_key,
        })
    if entry.dead_at is not None:
        headers["x-prefsync-dead-at"] = entry.dead_at.isoformat(timespec="milliseconds")
    return headers


def replay_headers(entry: Entry) -> dict[str, Any]:
    """Headers for a replayed message: the death and our dead-letter notes removed."""
    return {k: v for k, v in entry.headers.items()
            if k not in _DEATH_HEADERS and not k.startswith("x-prefsync-")}


def replay_refusal(entry: Entry) -> str | None:
    """Why an entry cannot be replayed, or None."""
    if entry.original_exchange not in REPLAYABLE:
        return f"original exchange {entry.original_exchange or '(none)'!r} is not replayable"
    if Topology.account_of_key(entry.original_routing_key) != entry.account:
        return f"original routing key {entry.original_routing_key!r} is outside {entry.account}"
    return None


@dataclass
class Walk:
    """What one command saw and did."""

    entries: list[Entry] = field(default_factory=list)   # the matching entries
    done: Counter[str] = field(default_factory=Counter)
    refused: list[tuple[Entry, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)     # accounts without a dead-letter queue


async def walk(connection: AbstractRobustConnection, *, accounts: Sequence[str], action: Action,
               reason: str | None = None, ids: Sequence[str] = (),
               meter: Meter | None = None) -> Walk:
    """Walk each account's dead-letter queue once, acting on the matching entries;
    ``meter`` shows how far each queue's walk has got."""
    result = Walk()
    publisher = await AmqpPublisher.open(connection)
    try:
        for account in accounts:
            await _walk_account(connection, publisher, result, account=account, action=action,
                                reason=reason, ids=ids, meter=meter)
    finally:
        await publisher.close()
    return result


async def _walk_account(connection: AbstractRobustConnection, publisher: AmqpPublisher,
                        result: Walk, *, account: str, action: Action, reason: str | None,
                        ids: Sequence[str], meter: Meter | None = None) -> None:
    name = Topology.dead_letter_queue(account)
    channel = await connection.channel()
    try:
        try:
            queue = await channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            result.missing.append(account)
            return
        count = queue.declaration_result.message_count or 0
        for position in range(1, count + 1):
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            entry = _entry(message, account=account, position=position)
            selected = entry.matches(reason=reason, ids=ids)
            if selected:
                result.entries.append(entry)
            await _settle(publisher, message, entry, selected=selected, action=action,
                          result=result)
            if meter is not None:
                meter.update(account, completed=position, total=count,
                             detail=f"entries; {result.done['replayed']} replayed")
    finally:
        await channel.close()


def _entry(message: AbstractIncomingMessage, *, account: str, position: int) -> Entry:
    return describe(account=account, position=position, headers=dict(message.headers or {}),
                    body=message.body, message_id=message.message_id or "",
                    timestamp=message.timestamp)


async def _settle(publisher: AmqpPublisher, message: AbstractIncomingMessage, entry: Entry, *,
                  selected: bool, action: Action, result: Walk) -> None:
    if selected and action == "purge":
        await message.ack()
        result.done["purged"] += 1
        return
    if selected and action == "replay":
        refusal = replay_refusal(entry)
        if refusal is None:
            try:
                await publisher.publish_many([Outgoing(
                    exchange=entry.original_exchange, routing_key=entry.original_routing_key,
                    body=entry.body, message_id=entry.message_id,
                    headers=replay_headers(entry))])
            except aio_pika.exceptions.DeliveryError as exc:
                refusal = f"the original route no longer exists ({exc})"
            else:
                await message.ack()
                result.done["replayed"] += 1
                return
        result.refused.append((entry, refusal))
    # put it back at the tail, unchanged, then let go of the original
    await publisher.publish_many([Outgoing(
        exchange=message.exchange or "", routing_key=message.routing_key or "",
        body=entry.body, message_id=entry.message_id, headers=kept_headers(entry))])
    await message.ack()
    result.done["kept"] += 1


# --- the command line -------------------------------------------------------------------------
def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _body_text(body: bytes) -> str:
    try:
        return orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        return repr(body[:2000])


def _print_entry(entry: Entry, *, now: datetime, full: bool, out: TextIO) -> None:
    route = f"{entry.original_exchange}/{entry.original_routing_key}"
    if not full:
        detail = entry.detail if len(entry.detail) <= 100 else entry.detail[:97] + "..."
        print(f"{entry.account}  #{entry.position}  {_age(entry.age_s(now)):>6}  "
              f"{entry.reason}{'/' + entry.code if entry.code else ''}  {route}  "
              f"{entry.message_id}  {detail}", file=out)
        return
    print(f"== {entry.account} #{entry.position} {entry.message_id}", file=out)
    print(f"  reason:   {entry.reason} (by {entry.by}){'  code: ' + entry.code if entry.code else ''}",
          file=out)
    print(f"  detail:   {entry.detail}", file=out)
    dead_at = entry.dead_at.isoformat() if entry.dead_at else "?"
    print(f"  dead at:  {dead_at} ({_age(entry.age_s(now))} ago), from queue {entry.queue}",
          file=out)
    print(f"  route:    {route}", file=out)
    for key in sorted(entry.headers):
        if key.startswith("x-") and key != "x-death":
            continue
        print(f"  header {key}: {entry.headers[key]!r}", file=out)
    print("  body:", file=out)
    for line in _body_text(entry.body).splitlines():
        print(f"    {line}", file=out)


async def dlq_command(*, config: Config, action: Action, account: str | None = None,
                      reason: str | None = None, ids: Sequence[str] = (),
                      out: TextIO = sys.stdout) -> int:
    """The CLI; returns the exit code (1 when an entry could not be replayed)."""
    accounts = [config.account(account).id] if account else [a.id for a in config.accounts]
    connection = await connect(config.broker.url, name="prefsync-dlq")
    # a replay may walk thousands of entries: its progress is shown (on a terminal only)
    with Meter(out=out, enabled=action == "replay") as meter:
        async with connection:
            result = await walk(connection, accounts=accounts, action=action, reason=reason,
                                ids=ids, meter=meter)
    now = datetime.now(UTC)
    for missing in result.missing:
        print(f"{missing}: no dead-letter queue (no service has started for this account)",
              file=out)
    for entry in result.entries:
        _print_entry(entry, now=now, full=action == "show", out=out)
    for entry, why in result.refused:
        print(f"not replayed: {entry.account} #{entry.position} {entry.message_id}: {why}",
              file=out)
    counts = {"list": f"{len(result.entries)} entr{'y' if len(result.entries) == 1 else 'ies'}",
              "show": f"{len(result.entries)} shown",
              "replay": f"{result.done['replayed']} replayed",
              "purge": f"{result.done['purged']} purged"}[action]
    print(f"dead letters: {counts} ({result.done['kept']} left in place)", file=out)
    return 1 if result.refused else 0
