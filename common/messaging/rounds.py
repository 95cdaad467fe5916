"""Rounds: the batches of a service's shard queues that arrive close together, handled as one.

Each shard queue's consumer hands its batch over and waits for it to be done before it takes the
next (per-email order: an email always goes to the same shard). Handled batch by batch, k small
changes spread over the shards would cost a ledger read and commit per shard (and, for the
writer, a vendor read and write per shard); gathered, they cost one read and one commit (and
``ceil(k / vendor batch size)`` writes, :mod:`services.writer.plans`). The writer gathers
its write rounds so; the reconciler its reconcile rounds.

1. The first batch to arrive opens a round; the round takes every batch that arrives within
   ``linger_s`` of it, or fewer when ``size`` batches (one per shard this replica consumes,
   as ``size`` says when the batch arrives) are in it already: a replica holding a share of
   the shards does not linger for batches that only other replicas will see.
2. The round is handled once (``handle``, e.g.
   :meth:`services.writer.pipeline.Writer.handle_round`). Each batch's call returns only when
   the whole round is committed in the ledger, so its consumer acks only after the durable
   side effect; each batch gets its own outcome.
3. A round that fails transiently (a dependency is down) fails each of its batches alike: each
   consumer retries in place, and they meet again in a later round.
4. A round of several batches that fails for another reason may have one bad message among
   them: each batch is then handled on its own, so the failure is found (and the message at
   fault dead-lettered) by its own consumer, and the others go through.
5. A round that is still lingering when the next arrives takes it; rounds being handled do
   not hold up the next one's linger.
6. While the call budget ran out lately (``budget`` says how long until a call could go, None
   while it did not), a round whose linger is over waits until no round is being handled and
   the budget could take its first call, and goes on taking batches meanwhile: its calls would
   only wait for the budget too, and one bigger round costs fewer of them (each dotdigital
   round reads the feeds once before it writes).
7. ``serial``: a round whose linger is over waits until no round is being handled, and goes on
   taking batches meanwhile (a group commit); rounds are handled one at a time, in the order
   they opened. The reconciler's rounds go so, with no linger: an idle reconciler handles a
   batch at once, a busy one handles what arrived meanwhile in one round, not one ledger
   transaction per shard after the other (the ledger takes one writer at a time anyway).
8. ``max_bytes``: a round whose messages' bodies hold that many bytes takes no more batches;
   the next batch opens the next round. Gathering is for small batches: a backlog's batches
   are big already, and a round of them all would hold several at once in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from common.messaging.abc import Delivery
from common.messaging.middleware import Handled
from common.messaging.resilience import dependency_of

log = logging.getLogger("prefsync.rounds")

# A round waiting for the budget looks again at least this often (rule 6).
MAX_BUDGET_WAIT_S = 5.0

# Handles a round's batches; returns each batch's outcome, in order.
RoundHandler = Callable[[Sequence[Sequence[Delivery]]], Awaitable[list[Handled]]]


class _Round:
    def __init__(self) -> None:
        self.batches: list[Sequence[Delivery]] = []
        self.results: list[asyncio.Future[Handled]] = []
        self.full = asyncio.Event()
        self.bytes = 0


class Rounds:
    """Gathers shard batches into rounds (see the module's docstring)."""

    def __init__(self, *, handle: RoundHandler, linger_s: float, size: int | Callable[[], int],
                 budget: Callable[[], float | None] | None = None,
                 serial: bool = False, max_bytes: int | None = None) -> None:
        if linger_s < 0 or (isinstance(size, int) and size < 1):
            raise ValueError("a round lingers zero seconds or more and takes at least a batch")
        self._handle = handle
        # rule 7: held while a round is handled (an asyncio lock wakes its waiters in order)
        self._turn = asyncio.Lock() if serial else None
        self._max_bytes = max_bytes
        self._linger_s = linger_s
        self._size = size if callable(size) else (lambda: size)
        self._budget = budget
        self._open: _Round | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._handling = 0  # rounds being handled
        self._none_handling = asyncio.Event()
        self._none_handling.set()

    async def handle(self, batch: Sequence[Delivery]) -> Handled:
        """Handle ``batch`` in the round open now (or a new one); returns once it is done."""
        loop = asyncio.get_running_loop()
        current = self._open
        if current is None or (self._max_bytes is not None
                               and current.bytes >= self._max_bytes):  # rule 8
            current = self._open = _Round()
            task = asyncio.create_task(self._run(current))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        result: asyncio.Future[Handled] = loop.create_future()
        current.batches.append(batch)
        current.results.append(result)
        if self._max_bytes is not None:
            current.bytes += sum(len(delivery.message.body) for delivery in batch)
        if len(current.batches) >= self._size():
            current.full.set()
        return await result

    async def _run(self, current: _Round) -> None:
        turn = False  # this round holds the turn (rule 7)
        try:
            try:
                if self._linger_s > 0:
                    # when the linger is over, the round takes what it has (rule 1)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(current.full.wait(), timeout=self._linger_s)
                await self._wait_for_budget()
                if self._turn is not None:
                    await self._turn.acquire()
                    turn = True
            finally:
                if self._open is current:
                    self._open = None
            self._handling += 1
            self._none_handling.clear()
            try:
                await self._handle_round(current)
            finally:
                self._handling -= 1
                if not self._handling:
                    self._none_handling.set()
        finally:
            if turn:
                assert self._turn is not None
                self._turn.release()

    async def _wait_for_budget(self) -> None:
        """Rule 6."""
        while self._budget is not None and (wait := self._budget()) is not None:
            if self._handling:
                await self._none_handling.wait()
            elif wait > 0:
                await asyncio.sleep(min(wait, MAX_BUDGET_WAIT_S))
            else:
                return

    async def _handle_round(self, current: _Round) -> None:
        pairs = list(zip(current.batches, current.results, strict=True))
        try:
            handled = await self._handle([batch for batch, _ in pairs])
        except asyncio.CancelledError:
            for _, result in pairs:
                result.cancel()
            raise
        except Exception as exc:
            if len(pairs) == 1 or dependency_of(exc) is not None:
                for _, result in pairs:
                    _settle(result, error=exc)  # rule 3
                return
            # so an operator sees it (only the error's kind: its text may name a person)
            log.warning("a round failed; its batches are handled one by one", extra={
                "batches": len(pairs), "error": type(exc).__name__})
            await asyncio.gather(*(self._alone(batch, result) for batch, result in pairs))
            return
        for (_, result), one in zip(pairs, handled, strict=True):
            _settle(result, value=one)

    async def _alone(self, batch: Sequence[Delivery], result: asyncio.Future[Handled]) -> None:
        """Rule 4."""
        try:
            [one] = await self._handle([batch])
        except asyncio.CancelledError:
            result.cancel()
            raise
        except Exception as exc:
            _settle(result, error=exc)
        else:
            _settle(result, value=one)


def _settle(result: asyncio.Future[Handled], *, value: Handled | None = None,
            error: BaseException | None = None) -> None:
    if result.done():
        return  # its consumer stopped waiting (it is stopping)
    if error is not None:
        result.set_exception(error)
    else:
        assert value is not None
        result.set_result(value)
