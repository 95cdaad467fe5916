"""Turning changes into confirmed messages: one envelope per (shard, chunk), ids that repeat.

Message ids are derived from what the message carries (run, page, shard, chunk), so a page that
is read and published again after a crash produces the same ids; consumers and the progress
tracker treat a repeated id as the same message.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from itertools import repeat
from typing import Any

import orjson

from common.domain import SIDES, Side, WriteCommand
from common.domain.clock import from_us
from common.domain.rows import CommandRow, KeyTuple
from common.domain.trusted import assembled_all
from common.messaging.abc import POLLED_AT as POLLED_AT  # (where it was first)
from common.messaging.abc import Outgoing, Publisher
from common.messaging.envelope import (
    Change,
    Envelope,
    MessageType,
    ReadComplete,
    Source,
    encode,
    encode_columns,
)
from common.messaging.envelope import WriteCommand as WriteMessage
from common.messaging.topology import CHANGES_EXCHANGE, CONTROL_EXCHANGE, WRITES_EXCHANGE, Topology, shard_of

# Changes per message: big enough to make broker and store work cheap per change, small enough
# that a redelivery repeats little work.
CHUNK = 500


class CapturingPublisher:
    """A :class:`~common.messaging.abc.Publisher` that keeps what it is given, in order, as if
    the broker had confirmed it, and sends nothing (a dry run; tests of what is published)."""

    def __init__(self) -> None:
        self.items: list[Outgoing] = []

    async def publish_many(self, items: Sequence[Outgoing]) -> None:
        self.items.extend(items)

    def on(self, exchange: str) -> list[Outgoing]:
        return [i for i in self.items if i.exchange == exchange]


def write_message(command: WriteCommand, *, covered: bool = False) -> WriteMessage:
    """A write command as the message that carries it to the writers."""
    return WriteMessage(email=command.key.email, preference_id=command.key.preference_id,
                        side=command.side, opted_in=command.opted_in,
                        origin_time=command.origin_time, origin_side=command.origin_side,
                        change_id=command.change_id, covered=covered)


def row_message(key: KeyTuple, command: CommandRow, *, covered: bool = False) -> WriteMessage:
    """:func:`write_message` of a command row of the batch fold kernel's, for ``key``."""
    side, opted_in, origin, origin_side, change_id = command
    return WriteMessage(email=key[1], preference_id=key[2], side=SIDES[side],
                        opted_in=bool(opted_in), origin_time=from_us(origin),
                        origin_side=SIDES[origin_side], change_id=change_id, covered=covered)


def row_messages_of(items: Sequence[tuple[KeyTuple, CommandRow, bool]]) -> list[WriteMessage]:
    """:func:`row_message` of each (key, command row, covered), in order: the same messages,
    built a column at a time (:func:`~common.domain.trusted.assembled_all`), which costs a
    fraction of a dataclass constructor per message."""
    commands = [command for _, command, _ in items]
    return assembled_all(
        WriteMessage, len(items), email=[key[1] for key, _, _ in items],
        preference_id=[key[2] for key, _, _ in items],
        side=[SIDES[command[0]] for command in commands],
        opted_in=[bool(command[1]) for command in commands],
        origin_time=[from_us(command[2]) for command in commands],
        origin_side=[SIDES[command[3]] for command in commands],
        change_id=[command[4] for command in commands],
        covered=[covered for _, _, covered in items])


def stable_id(*parts: object) -> str:
    return hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=12).hexdigest()


def _email_of(change: Change) -> str:
    email = getattr(change, "email", None)
    assert isinstance(email, str), "every routed change is for one email"
    return email


def _shard_chunks(emails: Iterable[str], shards: int
                  ) -> Iterator[tuple[int, int, list[int]]]:
    """How a batch of changes (given by their emails, in order) goes out: by shard, in shard
    order, at most :data:`CHUNK` to a message. Yields each message's shard, where its chunk
    starts among the shard's changes (with the shard, what its stable id is made of) and the
    places of its changes in the batch."""
    grouped: dict[int, list[int]] = defaultdict(list)  # places, by shard
    for place, shard in enumerate(map(shard_of, emails, repeat(shards))):
        grouped[shard].append(place)
    for shard in sorted(grouped):
        places = grouped[shard]
        for index in range(0, len(places), CHUNK):
            yield shard, index, places[index:index + CHUNK]


def envelopes_by_shard(
    *, account: str, source: Source, type: MessageType, changes: Sequence[Change], shards: int,
    run_id: str | None, id_seed: str, route: str = "changes", side: Side | None = None,
) -> list[Outgoing]:
    """Group ``changes`` by the shard of their email and wrap them in confirmed-publish items."""
    polled_at = int(time.time() * 1000)
    out: list[Outgoing] = []
    for shard, index, places in _shard_chunks(map(_email_of, changes), shards):
        chunk = tuple(map(changes.__getitem__, places))
        message_id = stable_id(id_seed, shard, index)
        newest: datetime = max(_origin(c) for c in chunk)
        envelope = Envelope(type=type, account=account, source=source, change_id=message_id,
                            origin_time=newest, changes=chunk, run_id=run_id)
        headers: dict[str, Any] = {}
        if route == "changes":
            exchange, key = CHANGES_EXCHANGE, Topology.changes_key(account, shard)
            headers[POLLED_AT] = polled_at
        else:
            assert side is not None
            exchange, key = WRITES_EXCHANGE, Topology.writes_key(account, side, shard)
        out.append(Outgoing(exchange=exchange, routing_key=key, headers=headers,
                            body=encode(envelope), message_id=message_id))
    return out


def column_envelopes_by_shard(
    *, account: str, source: Source, type: MessageType, columns: Mapping[str, Sequence[Any]],
    shards: int, run_id: str | None, id_seed: str,
) -> list[Outgoing]:
    """:func:`envelopes_by_shard` (to the changes exchange) of changes given as columns (see
    :func:`~common.messaging.envelope.encode_columns`): the same messages, with no change
    built (a test holds them equal)."""
    polled_at = int(time.time() * 1000)
    out: list[Outgoing] = []
    for shard, index, places in _shard_chunks(columns["email"], shards):
        message_id = stable_id(id_seed, shard, index)
        body = encode_columns(
            type=type, account=account, source=source, change_id=message_id, run_id=run_id,
            columns={name: list(map(values.__getitem__, places))
                     for name, values in columns.items()})
        out.append(Outgoing(exchange=CHANGES_EXCHANGE,
                            routing_key=Topology.changes_key(account, shard),
                            headers={POLLED_AT: polled_at}, body=body, message_id=message_id))
    return out


def read_markers(*, account: str, preference_id: int, started: datetime, shards: int,
                 run_id: str | None, id_seed: str) -> list[Outgoing]:
    """One marker per shard queue, published after every change of a complete feed read."""
    out = []
    for shard in range(shards):
        message_id = stable_id(id_seed, "marker", preference_id, shard)
        envelope = Envelope(type="read-markers", account=account, source="dotdigital",
                            change_id=message_id, origin_time=started, run_id=run_id,
                            changes=(ReadComplete(preference_id=preference_id,
                                                  origin_time=started),))
        out.append(Outgoing(exchange=CHANGES_EXCHANGE, routing_key=Topology.changes_key(account, shard),
                            body=encode(envelope), message_id=message_id))
    return out


def _origin(change: Change) -> datetime:
    origin = getattr(change, "origin_time", None)
    assert isinstance(origin, datetime)
    return origin


def progress_event(*, account: str, run_id: str, event: str,
                   fields: Mapping[str, Any]) -> Outgoing:
    """An advisory progress event for whoever follows the run (``sync-now --wait``), to
    publish (several of a batch's at once: one wait for the broker's confirms)."""
    body = orjson.dumps({"event": event, "account": account, "run_id": run_id, **fields})
    return Outgoing(
        exchange=CONTROL_EXCHANGE, routing_key=Topology.progress_key(account, run_id), body=body,
        message_id=stable_id(account, run_id, event, orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)),
        mandatory=False)


async def publish_progress(publisher: Publisher, *, account: str, run_id: str, event: str,
                           fields: Mapping[str, Any]) -> None:
    """Publish one :func:`progress_event`."""
    await publisher.publish_many([progress_event(account=account, run_id=run_id, event=event,
                                                 fields=fields)])


def ids_of(items: Iterable[Outgoing]) -> list[str]:
    return [i.message_id for i in items]
