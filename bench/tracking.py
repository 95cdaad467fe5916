"""Triggering runs and following them through the services' progress events, with a timeline.

The services publish advisory progress events for every run (``run-started``, ``poller-done``,
``reconciled``, ``written``); ``sync-now --wait`` folds them into a run summary. Here the same
events are also timed as they arrive, so a benchmark can tell when each stage of a run started
and ended, and how long each write took from the poll that read its change (the reconciler's
event carries when the change's message was published, right after its page was read) and from
the start of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import aio_pika
import orjson

from common.messaging.amqp import AmqpPublisher, Outgoing
from common.messaging.envelope import Envelope, encode
from common.messaging.publishing import stable_id
from common.messaging.topology import CONTROL_EXCHANGE, Topology
from common.runs import RunTracker, new_run_id


@dataclass
class RunRecord:
    """One run as the benchmark saw it; times are ``time.monotonic()`` seconds."""

    trigger_id: str
    triggered_at: float
    tracker: RunTracker
    started_at: float | None = None
    finished_at: float | None = None
    pollers_done_at: dict[str, float] = field(default_factory=dict)
    first_reconciled_at: float | None = None
    last_reconciled_at: float | None = None
    first_written_at: float | None = None
    last_written_at: float | None = None
    # (seconds from the start of the run to the write's progress event, writes in it)
    write_latencies: list[tuple[float, int]] = field(default_factory=list)
    # (seconds from the poll that read the change to the write's progress event, writes in it)
    poll_latencies: list[tuple[float, int]] = field(default_factory=list)
    # the same, by the side written
    side_latencies: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    # write message id -> when the poller read the change it came from (Unix time)
    polled_at: dict[str, float] = field(default_factory=dict)
    # write message id -> when the reconciler reported it emitted (Unix time, as received)
    reconciled_at: dict[str, float] = field(default_factory=dict)
    # by the side written, per stage ("to_reconciled": from the poll to the reconciler's
    # report; "to_written": from there to the write's): (seconds, writes in it)
    stage_latencies: dict[tuple[str, str], list[tuple[float, int]]] = field(
        default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def seconds(self) -> float:
        assert self.finished_at is not None
        return self.finished_at - self.triggered_at

    def summary(self) -> dict[str, Any]:
        return self.tracker.summary()

    def timeline(self) -> dict[str, float]:
        """Seconds from the trigger to each stage's first and last event."""
        def since(moment: float | None) -> float | None:
            return None if moment is None else round(moment - self.triggered_at, 3)

        points = {
            "run_started": since(self.started_at),
            **{f"{source}_read_done": since(at) for source, at in self.pollers_done_at.items()},
            "first_reconciled": since(self.first_reconciled_at),
            "last_reconciled": since(self.last_reconciled_at),
            "first_written": since(self.first_written_at),
            "last_written": since(self.last_written_at),
            "finished": since(self.finished_at),
        }
        return {k: v for k, v in points.items() if v is not None}


class Progress:
    """An account's progress events, followed from one exclusive queue."""

    def __init__(self, *, broker_url: str, account: str) -> None:
        self._url = broker_url
        self._account = account
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._publisher: AmqpPublisher | None = None
        self._by_trigger: dict[str, RunRecord] = {}
        self.events = 0

    async def __aenter__(self) -> Self:
        self._connection = await aio_pika.connect_robust(self._url)
        channel = await self._connection.channel()
        exchange = await channel.get_exchange(CONTROL_EXCHANGE, ensure=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key=f"{self._account}.progress.#")
        await queue.consume(self._on_message, no_ack=True)
        self._publisher = await AmqpPublisher.open(self._connection)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()

    async def trigger(self) -> RunRecord:
        """Ask for a run now (as ``sync-now`` does); the record fills in as events arrive."""
        assert self._publisher is not None
        trigger_id = new_run_id()
        record = RunRecord(trigger_id=trigger_id, triggered_at=time.monotonic(),
                           tracker=RunTracker(trigger_id=trigger_id))
        self._by_trigger[trigger_id] = record
        envelope = Envelope(type="sync-trigger", account=self._account, source="control",
                            change_id=stable_id("bench", trigger_id),
                            origin_time=datetime.now(UTC), changes=(), run_id=trigger_id,
                            extra={"reason": "sync-now"})
        await self._publisher.publish_many([Outgoing(
            exchange=CONTROL_EXCHANGE, routing_key=Topology.trigger_key(self._account),
            body=encode(envelope), message_id=envelope.change_id)])
        return record

    async def sync(self, *, timeout_s: float) -> RunRecord:
        """Trigger a run and wait until it is finished."""
        record = await self.trigger()
        await self.wait(record, timeout_s=timeout_s)
        return record

    async def wait(self, record: RunRecord, *, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(record.done.wait(), timeout_s)
        except TimeoutError:
            raise TimeoutError(f"run {record.trigger_id} not finished after {timeout_s:.0f} s: "
                               f"{record.summary()}") from None

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        now = time.monotonic()
        wall = time.time()
        self.events += 1
        try:
            event = orjson.loads(message.body)
        except orjson.JSONDecodeError:
            return
        kind = event.get("event")
        # every record's tracker tells which runs are its own (RunTracker's rules)
        for record in self._by_trigger.values():
            if record.done.is_set():
                continue
            tracker = record.tracker
            if kind == "run-started":
                before = tracker.run_id
                tracker.feed(event)
                if before is None and tracker.run_id is not None:
                    record.started_at = now
                continue
            if not tracker.follows(event.get("run_id")):
                continue
            tracker.feed(event)
            if kind != "poller-done" or tracker.pollers_done.get(
                    str(event.get("source"))) is event:
                self._note(record, kind, event, now, wall)
            if tracker.finished:
                record.finished_at = now
                record.done.set()

    @staticmethod
    def _note(record: RunRecord, kind: Any, event: dict[str, Any], now: float,
              wall: float) -> None:
        if kind == "poller-done":
            record.pollers_done_at[str(event.get("source"))] = now
        elif kind == "reconciled":
            record.first_reconciled_at = record.first_reconciled_at or now
            record.last_reconciled_at = now
            polled = event.get("polled_at_ms")
            writes = event.get("writes") or []
            record.reconciled_at.update(dict.fromkeys(writes, wall))
            if isinstance(polled, int):
                record.polled_at.update(dict.fromkeys(writes, polled / 1000))
        elif kind == "written":
            record.first_written_at = record.first_written_at or now
            record.last_written_at = now
            written = int(event.get("written", 0))
            if written and record.started_at is not None:
                record.write_latencies.append((now - record.started_at, written))
            message, side = str(event.get("message")), str(event.get("side"))
            polled = record.polled_at.get(message)
            if written and polled is not None:
                record.poll_latencies.append((wall - polled, written))
                record.side_latencies.setdefault(side, []).append((wall - polled, written))
                reconciled = record.reconciled_at[message]
                record.stage_latencies.setdefault((side, "to_reconciled"), []).append(
                    (reconciled - polled, written))
                record.stage_latencies.setdefault((side, "to_written"), []).append(
                    (wall - reconciled, written))
