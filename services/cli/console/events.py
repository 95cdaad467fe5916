"""Live updates: the runs in progress, followed from their progress events, and the server-sent
events that carry them to the pages.

The services publish progress events for every run on the control exchange (the ones
``sync-now --wait`` and the status recorder follow). The console follows every account's events
on one queue of its own and folds them per run (:class:`LiveRuns`), so a page shows a run's
counts (read, applied, failed) while it goes. The stored status (the dynamics-poller's) stays
the reference for everything else: each stream reads it again when an event arrives and every
``POLL_S`` seconds, and sends a fragment of HTML only when it changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiohttp import web

from services.cli.console.backend import CONTROL_EXCHANGE, BrokerLink, FollowedRuns, run_counts

log = logging.getLogger("prefsync.console.events")

POLL_S = 2.0
# events of one burst are folded into one update
SETTLE_S = 0.2
KEEPALIVE_S = 15.0
# runs followed per account (a run whose end was never seen is forgotten after this many)
MAX_RUNS = 20


class LiveRuns:
    """Per account, the runs whose start was seen and whose end was not yet, as trackers."""

    def __init__(self, accounts: Sequence[str]) -> None:
        self._accounts = list(accounts)
        self._runs: dict[str, FollowedRuns] = {a: FollowedRuns(limit=MAX_RUNS)
                                                for a in accounts}
        # set (and replaced) at each event: every stream waiting wakes up
        self._tick = asyncio.Event()

    def feed(self, account: str, event: dict[str, Any]) -> None:
        runs = self._runs.get(account)
        if runs is None:
            return
        runs.feed(event)
        self._tick.set()
        self._tick = asyncio.Event()

    def progress(self, account: str, run: str) -> dict[str, int] | None:
        """The counts of a run in progress so far (None: not followed here)."""
        followed = self._runs.get(account)
        tracker = None if followed is None else followed.runs.get(run)
        return None if tracker is None else run_counts(tracker)

    async def wait(self, timeout_s: float) -> None:
        """Until the next progress event (or the timeout)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._tick.wait(), timeout_s)

    async def follow(self, broker: BrokerLink) -> None:
        """Consume every account's progress events until cancelled (once the broker is up)."""
        await broker.ready.wait()
        connection = broker.connection
        assert connection is not None
        await self._consume(connection)

    async def _consume(self, connection: AbstractRobustConnection) -> None:
        channel = await connection.channel()
        try:
            exchange = await channel.get_exchange(CONTROL_EXCHANGE, ensure=True)
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            for account in self._accounts:
                await queue.bind(exchange, routing_key=f"{account}.progress.#")

            async def on_event(message: AbstractIncomingMessage) -> None:
                async with message.process():
                    with contextlib.suppress(orjson.JSONDecodeError):
                        event = orjson.loads(message.body)
                        if isinstance(event, dict):
                            self.feed(str(event.get("account")), event)

            await queue.consume(on_event)
            await asyncio.Future()  # until cancelled
        finally:
            with contextlib.suppress(Exception):
                await channel.close()


Fragments = Callable[[], Awaitable[dict[str, str]]]


async def stream(request: web.Request, *, live: LiveRuns, fragments: Fragments) -> web.StreamResponse:
    """Server-sent events: ``{"target": element id, "html": its new content}`` for each part of
    the page that changed, until the browser goes away."""
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-store",
        "X-Accel-Buffering": "no"})
    await response.prepare(request)
    sent: dict[str, str] = {}
    quiet_s = 0.0
    try:
        while True:
            parts = await fragments()
            changed = {target: html for target, html in parts.items() if sent.get(target) != html}
            for target, html in changed.items():
                data = orjson.dumps({"target": target, "html": html}).decode()
                await response.write(f"event: fragment\ndata: {data}\n\n".encode())
            sent.update(changed)
            if changed:
                quiet_s = 0.0
            elif quiet_s >= KEEPALIVE_S:
                await response.write(b": keep-alive\n\n")
                quiet_s = 0.0
            started = asyncio.get_running_loop().time()
            await live.wait(POLL_S)
            await asyncio.sleep(SETTLE_S)
            quiet_s += asyncio.get_running_loop().time() - started
    except ConnectionResetError:  # the browser went away
        pass
    return response
