"""The RabbitMQ topology, declared once: exchanges, quorum queues, bindings and dead-lettering.

Every routing key starts with the account id, on topic exchanges, so the broker's topic
permissions can confine each account's services to their own prefix. Changes and write commands
are partitioned into ``shards`` quorum queues per account by a hash of the email; each queue has a
single active consumer, so changes for one (account, email) are handled by one consumer at a
time, in order. Every work queue has a delivery limit and dead-letters (at least once) into the
account's own dead-letter queue. Every change message is also appended to the account's changes
log, a stream kept for a retention period, which ``prefsync replay`` reads back.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel

from common.config import ACCOUNT_ID
from common.domain.sides import SIDES, Side

log = logging.getLogger("prefsync.topology")

CHANGES_EXCHANGE = "prefsync.changes"
WRITES_EXCHANGE = "prefsync.writes"
CONTROL_EXCHANGE = "prefsync.control"
DEAD_EXCHANGE = "prefsync.dead"

POLLERS = ("dynamics-poller", "ec-poller")
# a work or control queue's name, from the one key bound to it
_QUEUE = "prefsync.{}"

# RabbitMQ 4.x defaults quorum queues to 20; 3.10 has no default, so set it everywhere.
DELIVERY_LIMIT = 20
# How long the changes log keeps messages (RabbitMQ's x-max-age units: Y M D h m s).
CHANGES_LOG_MAX_AGE = "7D"
MAX_AGE = re.compile(r"^[1-9][0-9]*[YMDhms]$")


def shard_of(email: str, shards: int) -> int:
    """Stable shard of a normalised email (crc32: fast and identical in every process)."""
    return zlib.crc32(email.encode("utf-8")) % shards


@dataclass(frozen=True, kw_only=True)
class ExchangeSpec:
    name: str
    type: aio_pika.ExchangeType = aio_pika.ExchangeType.TOPIC


@dataclass(frozen=True, kw_only=True)
class QueueSpec:
    name: str
    account: str
    bindings: tuple[tuple[str, str], ...]
    single_active_consumer: bool = False
    dead_letter_key: str | None = None
    arguments: Mapping[str, Any] = field(default_factory=dict)

    def declare_arguments(self) -> dict[str, Any]:
        args: dict[str, Any] = {"x-queue-type": "quorum", **self.arguments}
        if self.single_active_consumer:
            args["x-single-active-consumer"] = True
        if self.dead_letter_key is not None:
            args.update({
                "x-delivery-limit": DELIVERY_LIMIT,
                "x-dead-letter-exchange": DEAD_EXCHANGE,
                "x-dead-letter-routing-key": self.dead_letter_key,
                # at-least-once dead-lettering needs reject-publish overflow
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            })
        return args


class TopologyError(ValueError):
    pass


class Topology:
    """All names and declarations for a set of accounts, validated at construction."""

    exchanges: tuple[ExchangeSpec, ...] = (
        ExchangeSpec(name=CHANGES_EXCHANGE),
        ExchangeSpec(name=WRITES_EXCHANGE),
        ExchangeSpec(name=CONTROL_EXCHANGE),
        ExchangeSpec(name=DEAD_EXCHANGE),
    )

    def __init__(self, *, accounts: Iterable[str], shards: int,
                 changes_log_max_age: str = CHANGES_LOG_MAX_AGE) -> None:
        self.accounts = tuple(accounts)
        if shards < 1:
            raise TopologyError("shards must be at least 1")
        self.shards = shards
        if not MAX_AGE.match(changes_log_max_age):
            raise TopologyError(f"changes log retention {changes_log_max_age!r} must look like "
                                "7D, 12h or 30m (units Y M D h m s)")
        self.changes_log_max_age = changes_log_max_age
        for account in self.accounts:
            if not ACCOUNT_ID.match(account):
                raise TopologyError(f"account id {account!r} cannot be used in routing keys")
        self.queues = tuple(q for a in self.accounts for q in self._account_queues(a))
        names = [q.name for q in self.queues]
        if len(set(names)) != len(names):
            raise TopologyError("queue names are not unique")
        for queue in self.queues:
            for _, key in queue.bindings:
                if not key.startswith(f"{queue.account}."):
                    raise TopologyError(f"binding {key!r} of {queue.name} is outside its account")

    # --- names -------------------------------------------------------------------------------
    @staticmethod
    def changes_key(account: str, shard: int) -> str:
        return f"{account}.changes.{shard}"

    @staticmethod
    def writes_key(account: str, side: Side, shard: int) -> str:
        return f"{account}.writes.{side}.{shard}"

    @staticmethod
    def trigger_key(account: str, poller: str = "dynamics-poller") -> str:
        """A sync run starts at the dynamics-poller, which then starts the ec-poller's part."""
        return f"{account}.control.{poller}"

    @staticmethod
    def progress_key(account: str, run_id: str) -> str:
        return f"{account}.progress.{run_id}"

    @staticmethod
    def dead_key(account: str, kind: str) -> str:
        return f"{account}.dead.{kind}"

    @staticmethod
    def changes_queue(account: str, shard: int) -> str:
        return _QUEUE.format(Topology.changes_key(account, shard))

    @staticmethod
    def writes_queue(account: str, side: Side, shard: int) -> str:
        return _QUEUE.format(Topology.writes_key(account, side, shard))

    @staticmethod
    def changes_log(account: str) -> str:
        """The account's changes log (a stream; not under ``changes`` so no shard query sees it)."""
        return f"prefsync.{account}.log.changes"

    @staticmethod
    def changes_log_mark_key(account: str) -> str:
        """A routing key only the changes log is bound to (replay marks the end it reads to)."""
        return f"{account}.log.mark"

    @staticmethod
    def trigger_queue(account: str, poller: str) -> str:
        return _QUEUE.format(Topology.trigger_key(account, poller))

    @staticmethod
    def dead_letter_queue(account: str) -> str:
        return f"prefsync.{account}.dead-letters"

    @staticmethod
    def account_of_key(routing_key: str) -> str:
        return routing_key.split(".", 1)[0]

    @staticmethod
    def account_of_queue(queue: str) -> str:
        parts = queue.split(".")
        return parts[1] if len(parts) > 2 and parts[0] == "prefsync" else ""

    # --- declarations ------------------------------------------------------------------------
    def _account_queues(self, account: str) -> list[QueueSpec]:
        queues = [
            QueueSpec(
                name=self.changes_queue(account, shard), account=account,
                bindings=((CHANGES_EXCHANGE, self.changes_key(account, shard)),),
                single_active_consumer=True, dead_letter_key=self.dead_key(account, "changes"),
            )
            for shard in range(self.shards)
        ]
        queues += [
            QueueSpec(
                name=self.writes_queue(account, side, shard), account=account,
                bindings=((WRITES_EXCHANGE, self.writes_key(account, side, shard)),),
                single_active_consumer=True, dead_letter_key=self.dead_key(account, f"writes-{side}"),
            )
            for side in SIDES
            for shard in range(self.shards)
        ]
        queues += [
            QueueSpec(
                name=self.trigger_queue(account, poller), account=account,
                bindings=((CONTROL_EXCHANGE, self.trigger_key(account, poller)),),
                single_active_consumer=True, dead_letter_key=self.dead_key(account, poller),
            )
            for poller in POLLERS
        ]
        queues.append(QueueSpec(
            name=self.dead_letter_queue(account), account=account,
            bindings=((DEAD_EXCHANGE, f"{account}.dead.#"),),
        ))
        queues.append(QueueSpec(
            name=self.changes_log(account), account=account,
            # one binding per shard, not ``changes.*``: a key for no shard must stay unroutable
            bindings=(*((CHANGES_EXCHANGE, self.changes_key(account, shard))
                        for shard in range(self.shards)),
                      (CHANGES_EXCHANGE, self.changes_log_mark_key(account))),
            arguments={"x-queue-type": "stream", "x-max-age": self.changes_log_max_age},
        ))
        return queues

    async def declare(self, channel: AbstractChannel, *, exchanges_too: bool = True) -> None:
        """Declare everything; safe to run again (declarations are idempotent).

        ``exchanges_too=False``: the exchanges must exist already (an account's own broker user
        may not configure the shared exchanges; ``prefsync broker setup`` declares them)."""
        exchanges = {}
        for spec in self.exchanges:
            if not exchanges_too:
                try:
                    exchanges[spec.name] = await channel.get_exchange(spec.name, ensure=True)
                except aio_pika.exceptions.ChannelNotFoundEntity:
                    raise TopologyError(f"exchange {spec.name} does not exist: run `prefsync "
                                        "broker setup` first") from None
                continue
            exchanges[spec.name] = await channel.declare_exchange(
                spec.name, spec.type, durable=True)
        for queue_spec in self.queues:
            try:
                queue = await channel.declare_queue(
                    queue_spec.name, durable=True, arguments=queue_spec.declare_arguments())
            except aio_pika.exceptions.ChannelPreconditionFailed:
                if queue_spec.name != self.changes_log(queue_spec.account):
                    raise
                # A stream's retention is fixed when it is first declared; keep that one.
                log.warning("the changes log keeps the retention it was first declared with "
                            "(delete the stream to declare it again with the new one)",
                            extra={"account": queue_spec.account, "queue": queue_spec.name})
                await channel.reopen()
                queue = await channel.declare_queue(queue_spec.name, passive=True)
            for exchange, key in queue_spec.bindings:
                await queue.bind(exchanges[exchange], routing_key=key)

    def queues_for(self, account: str, kind: str) -> list[QueueSpec]:
        prefix = f"prefsync.{account}.{kind}"
        return [q for q in self.queues if q.name.startswith(prefix)]
