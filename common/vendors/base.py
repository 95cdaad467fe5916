"""What both vendor clients share: typed vendor errors, the one retry policy, pacing, and the
per-request observation event.

Pacing spends a client's request budget (less the reserve left for the customer's other
integrations) as the window it is, shared through a ledger with the other processes calling
as the same API user, within a concurrency cap; when the vendor says to wait (``Retry-After``,
``X-RateLimit-Reset``) every request of that client waits, not only the one that was refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar

from common.vendors.budget import Budget, BudgetGrant, BudgetLedger, LocalLedger

T = TypeVar("T")

log = logging.getLogger(__name__)

# A wait header above this is a Unix epoch (when to retry), below it a number of seconds.
_EPOCH_THRESHOLD = 1_000_000_000

# How long claimed tokens may be spent. The ledger remembers a claim for the vendor's window
# plus this, so tokens spent late in their hold still fall inside what the ledger counts; it
# also absorbs a request that reaches the vendor a little later than another.
HOLD_S = 1.0
# A shared ledger that takes longer than this to answer is treated as unavailable...
CLAIM_TIMEOUT_S = 5.0
# ...and is asked again after this long (meanwhile the client paces to a local share).
LEDGER_RETRY_S = 30.0
# never ask an exhausted ledger again sooner than this (no hot loop on a rounding error)
_MIN_WAIT_S = 0.01


class VendorError(Exception):
    """An error answered by a vendor API, carrying the vendor's own code.

    ``code`` is Dataverse's hex code (``0x80060882``), dotdigital's v2 ``ERROR_*`` token or its
    v3 ``errorCode``. Messages never include credentials.
    """

    def __init__(self, *, vendor: str, status: int, code: str, message: str,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{vendor} {status} {code or '-'}: {message}")
        self.vendor = vendor
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        # set by the retry policy: an earlier attempt of the same request may have been
        # delivered (its connection was lost), so this answer does not say it had no effect
        self.earlier_maybe_delivered = False

    @property
    def retryable(self) -> bool:
        return self.status in (408, 429) or self.status >= 500

    @property
    def permanent(self) -> bool:
        return not self.retryable


class AuthenticationError(VendorError):
    """Credentials refused (bad secret, bad scope, expired token that could not be renewed)."""


class ThrottledError(VendorError):
    """The vendor's rate limit answered 429 (raised to the caller once retries ran out, or
    when waiting as asked would pass the call's deadline), or a usage cap refused the call.
    Never a reason to drop the work: it is always worth retrying later."""

    @property
    def retryable(self) -> bool:
        return True


class PausedPastDeadline(Exception):
    """No call may go before the call's deadline: the client is paused (the vendor asked it to
    wait), or the request budget has no call for it until then."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(f"no call for {wait_s:.1f} s more")
        self.wait_s = wait_s


class TransportError(Exception):
    """The vendor could not be reached (connection refused, reset, timed out).

    ``maybe_delivered`` is False only when the request certainly never left (the connection
    could not be opened); a non-idempotent request is retried only then.
    """

    def __init__(self, *, vendor: str, detail: str, maybe_delivered: bool = True) -> None:
        super().__init__(f"{vendor} unreachable: {detail}")
        self.vendor = vendor
        self.detail = detail
        self.maybe_delivered = maybe_delivered
        self.retryable = True


class WriteRefused(RuntimeError):
    """A read-only client (a dry run) was asked to change something at the vendor; nothing was
    sent."""

    def __init__(self, *, vendor: str, endpoint: str) -> None:
        super().__init__(f"{vendor}: read-only client refused {endpoint}")


@dataclass(frozen=True, kw_only=True)
class RequestEvent:
    """One HTTP exchange with a vendor, as seen by the client (one per attempt).

    ``endpoint`` is a route template such as ``"GET /v2/contacts/{email}/subscriptions"``: it
    never holds an email address or a record id. ``status`` is 0 when no response came back.
    ``throttled_wait_s`` is how long this attempt was held back because the vendor asked the
    client to wait (429 ``Retry-After`` / ``X-RateLimit-Reset``), before it was sent.
    """

    vendor: str
    endpoint: str
    status: int
    seconds: float
    throttled_wait_s: float = 0.0


RequestObserver = Callable[[RequestEvent], None]


def parse_wait(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` or ``X-RateLimit-Reset`` value.

    A number above 10^9 is a Unix epoch (when to retry), a smaller one a number of seconds; an
    HTTP date is also accepted. Unparseable values give None.
    """
    if value is None or not value.strip():
        return None
    current = time.time() if now is None else now
    try:
        number = float(value.strip())
    except ValueError:
        try:
            when = parsedate_to_datetime(value.strip())
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, when.timestamp() - current)
    if number != number or number in (float("inf"), float("-inf")):  # NaN or infinite
        return None
    if number > _EPOCH_THRESHOLD:
        return max(0.0, number - current)
    return max(0.0, number)


@dataclass(frozen=True, kw_only=True)
class ClockReading:
    """A vendor's clock, read in an answer: it said ``vendor_time`` (truncated to
    ``resolution_s``) at some moment between ``sent`` and ``received``, Unix times of ours."""

    vendor_time: datetime
    resolution_s: float
    sent: float
    received: float
    source: str


class ClockReadings:
    """The newest clock readings a client took, until someone takes them (bounded). One
    answer's reading counts once, however many reads it bounds (``time_before``)."""

    def __init__(self, *, keep: int = 8) -> None:
        self._readings: deque[ClockReading] = deque(maxlen=keep)
        self._added: deque[ClockReading] = deque(maxlen=64)

    def add(self, reading: ClockReading) -> None:
        if reading in self._added:
            return
        self._added.append(reading)
        self._readings.append(reading)

    def take(self) -> list[ClockReading]:
        taken = list(self._readings)
        self._readings.clear()
        return taken


def http_date(value: str | None) -> datetime | None:
    """An HTTP ``Date`` header (whole seconds, UTC), or None when missing or unreadable."""
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError):
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Retries for 429, 5xx and connection errors only, with full-jitter exponential backoff.

    1. A 429 waits what the vendor asked (``retry_after``) plus a little jitter, bounded by
       ``max_retry_after_s``; it does not use up the attempts meant for failures.
    2. A request that is not idempotent is retried after a 5xx or a lost connection only if it
       certainly was not delivered, so a create is never applied twice.
    3. With a ``deadline`` (``time.monotonic()``), no wait or retry starts that would end past
       it: the last error is raised at once (a 429 as :class:`ThrottledError`), so a message
       handler never holds its message for long (the broker takes a message back from a
       consumer that holds it past its ``consumer_timeout``); the work is retried later.
    4. An error raised after an attempt that may have been delivered (its connection lost)
       says so (``earlier_maybe_delivered``): a write refused at the retry may still have
       landed at the attempt before.
    """

    attempts: int = 6
    base_delay_s: float = 0.25
    max_delay_s: float = 20.0
    max_retry_after_s: float = 330.0
    max_throttled_waits: int = 50

    def backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * (2 ** attempt)))

    async def run(
        self,
        call: Callable[[], Awaitable[T]],
        *,
        on_throttled: Callable[[float], None] | None = None,
        idempotent: bool = True,
        deadline: float | None = None,
    ) -> T:
        failures = 0
        throttled = 0
        maybe_delivered = False  # an attempt so far may have reached the vendor unanswered

        def past_deadline(wait: float) -> bool:
            return deadline is not None and time.monotonic() + wait > deadline

        while True:
            try:
                return await call()
            except VendorError as exc:
                exc.earlier_maybe_delivered = exc.earlier_maybe_delivered or maybe_delivered
                if exc.status == 429 and throttled < self.max_throttled_waits:
                    throttled += 1
                    wait = min(exc.retry_after if exc.retry_after is not None
                               else self.backoff(throttled), self.max_retry_after_s)
                    if past_deadline(wait):
                        raise
                    if on_throttled is not None:
                        on_throttled(wait)
                    await asyncio.sleep(wait + random.uniform(0, 0.05))
                    continue
                if (not exc.retryable or exc.status == 429 or not idempotent
                        or isinstance(exc, ThrottledError) or failures + 1 >= self.attempts):
                    raise
                delay = self.backoff(failures + 1)
                if past_deadline(delay):
                    raise
            except TransportError as exc:
                if (exc.maybe_delivered and not idempotent) or failures + 1 >= self.attempts:
                    raise
                maybe_delivered = maybe_delivered or exc.maybe_delivered
                delay = self.backoff(failures + 1)
                if past_deadline(delay):
                    raise
            failures += 1
            await asyncio.sleep(delay)


@dataclass
class _VendorWindow:
    """The vendor's current rate-limit window, as its answers report it."""

    ends: float  # on the pacer's clock, when it resets (never earlier than it does)
    remaining: int  # calls left in it, as far as this client knows
    reserved: int  # of those, the calls left for the customer's other integrations


class Pacer:
    """Spends one client's request budget as the window it is, within a concurrency cap, and
    honours the vendor's pauses.

    1. Tokens come from a ledger of claims (:mod:`common.vendors.budget`): over any window of
       the vendor's length (plus ``HOLD_S``) the claims of every process sharing the
       ledger's ``bucket`` add up to at most ``budget.spendable``, the budget less its reserve.
       After an idle window that much may go at once; then the next call waits for the oldest
       claim to be forgotten.
    2. A claim asks for a token for every request waiting for one (at most the concurrency
       cap), so under load one round trip to a shared ledger serves several requests, and a
       lone request takes no more than it needs. Claimed tokens are spent within ``HOLD_S``
       or dropped (a request that gave up); the ledger remembers them either way. A refused
       claim holds until the time the ledger named, for every request waiting.
    3. Without a shared ledger (a one-off command) the ledger is this process's own. When the
       shared one fails or does not answer within ``CLAIM_TIMEOUT_S``, the client carries on
       with its own, at a conservative share (the budget over the claimers last seen, at
       least two), and tries the shared one again after ``LEDGER_RETRY_S``.
    4. Once the vendor's answers say how many calls remain in its window and when it resets
       (:meth:`observe_budget`), no call goes while only the reserve remains: the calls the
       customer's other integrations made count too, and the reserve is left to them.
    5. When the vendor asks the client to wait (``Retry-After``, a spent window), every
       request of the client waits (:meth:`pause_for`), not only the one that was refused.
    6. While the budget is not short, a claim also asks ahead for as many tokens as this
       client took in the last ``HOLD_S``, up to its share of what the budget allows in a
       ``HOLD_S`` (``spendable * HOLD_S / window_s`` over the claimers last seen, at least
       two): a client calling steadily claims about once a hold instead of once every few
       calls, and each claim is a write to the shared ledger that waits for every other
       process's. A client whose calls stop leaves at most one hold's worth of its recent
       calls unspent. A budget of a few calls a minute (a share under one token) is never
       claimed ahead.
    7. A request with a deadline never waits past it, for a vendor pause or for the budget:
       it raises at once instead. (A write must go soon after the read before it, or not at
       all: :data:`services.writer.dotdigital.READ_FRESH_S`.)
    """

    def __init__(self, *, budget: Budget, max_concurrency: int,
                 ledger: BudgetLedger | None = None, bucket: str = "",
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if max_concurrency < 1:
            raise ValueError("Pacer needs max_concurrency >= 1")
        self.budget = budget
        self._span_s = budget.window_s + HOLD_S
        self._concurrency = asyncio.Semaphore(max_concurrency)
        self._max_block = max_concurrency
        self._ledger = ledger
        self._bucket = bucket
        self._claimer = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._own = LocalLedger(clock=clock)
        self._clock = clock
        self._sleep = sleep
        self._claiming = asyncio.Lock()
        self._waiting = 0
        self._held = 0  # tokens claimed and not spent yet
        self._held_until = 0.0
        self._refused_until = 0.0  # no claim is granted before then, as the ledger said
        self._sharers = 0  # claimers the shared ledger last named
        self._ledger_retry_at = 0.0
        self._paused_until = 0.0
        self._short_until = 0.0  # see short
        self._window: _VendorWindow | None = None
        self.waited_s = 0.0
        self.claims = 0  # round trips to the ledger, for measurement
        # when the tokens taken in the last HOLD_S were taken (rule 6), at most a share's worth
        self._taken: deque[float] = deque(maxlen=self._share(claimers=2) + 1)

    def observe_budget(self, *, remaining: int, reset_s: float, limit: int | None = None) -> None:
        """An answer's word on the vendor's window: ``remaining`` calls left in it of
        ``limit`` (when it says), and it resets ``reset_s`` from now (whole seconds, rounded
        up)."""
        now = self._clock()
        ends = now + max(0.0, reset_s)
        reserved = self.budget.reserved if limit is None else self.budget.reserved_of(limit)
        window = self._window
        if window is None or now >= window.ends or ends > window.ends + 2.0:
            self._window = _VendorWindow(ends=ends, remaining=remaining, reserved=reserved)
        else:  # the same window: answers may arrive out of order, the lowest count is newest
            window.remaining = min(window.remaining, remaining)
            window.ends = min(window.ends, ends)
            window.reserved = reserved

    def pause_for(self, seconds: float) -> None:
        """Every request of this client waits until ``seconds`` from now have passed."""
        self._paused_until = max(self._paused_until, self._clock() + max(0.0, seconds))

    @property
    def paused_for(self) -> float:
        return max(0.0, self._paused_until - self._clock())

    @property
    def short(self) -> bool:
        """The budget ran out lately: less than a window ago a claim was refused, or only the
        vendor's reserve was left, and calls waited for it. Whoever decides how to spend calls
        (the writer's rounds) can then spend fewer, bigger ones: more calls sooner would only
        wait too."""
        return self._clock() < self._short_until

    def next_call_s(self) -> float:
        """Seconds until a call could go, as far as this pacer knows (0: now): the vendor's
        pause, the ledger's last refusal, the vendor's window down to its reserve."""
        if self._holding():
            return 0.0
        now = self._clock()
        return max(0.0, self._paused_until - now, self._refused_until - now,
                   self._vendor_wait())

    @property
    def waiting(self) -> int:
        """Requests waiting for budget (holding a slot of the concurrency cap)."""
        return self._waiting

    @asynccontextmanager
    async def slot(self, *, deadline: float | None = None) -> AsyncIterator[float]:
        """Hold one request slot; yields the seconds this request spent in a vendor pause.

        A pause, or a wait for the budget, that would last past ``deadline`` (on the pacer's
        clock, ``time.monotonic()`` by default) raises :class:`PausedPastDeadline` instead of
        being waited out (rule 7)."""
        async with self._concurrency:
            paused = 0.0
            while (delay := self._paused_until - self._clock()) > 0:
                if deadline is not None and self._clock() + delay > deadline:
                    raise PausedPastDeadline(delay)
                paused += delay
                await self._sleep(delay)
            started = self._clock()
            await self._spend(deadline)
            self.waited_s += paused + self._clock() - started
            yield paused

    async def _spend(self, deadline: float | None) -> None:
        self._waiting += 1
        try:
            while True:
                wait = self._vendor_wait()
                if wait <= 0 and self._take():
                    return
                if wait <= 0:
                    async with self._claiming:
                        if self._holding():
                            continue  # claimed by another request meanwhile
                        # a refusal holds for every request that queued behind it
                        wait = self._refused_until - self._clock()
                        if wait <= 0:
                            wait = await self._claim(min(self._waiting, self._max_block))
                if wait > 0:
                    if deadline is not None and self._clock() + wait > deadline:
                        raise PausedPastDeadline(wait)
                    await self._sleep(wait)
        finally:
            self._waiting -= 1

    def _vendor_wait(self) -> float:
        """Seconds until the vendor's window resets, while only its reserve remains (rule 4)."""
        window, now = self._window, self._clock()
        if window is not None and now >= window.ends:
            self._window = window = None  # reset: unknown again until the next answer
        if window is None or window.remaining > window.reserved:
            return 0.0
        self._short_until = max(self._short_until, window.ends + self.budget.window_s)
        return window.ends - now

    def _holding(self) -> bool:
        return self._held > 0 and self._clock() < self._held_until

    def _take(self) -> bool:
        if not self._holding():
            return False
        self._held -= 1
        self._taken.append(self._clock())
        if self._window is not None:
            self._window.remaining -= 1
        return True

    async def _claim(self, tokens: int) -> float:
        """Claim ``tokens``; 0 once some are held, else the seconds to wait before asking
        again."""
        asked = self._clock()
        tokens = max(tokens, self._ahead(asked))
        grant = await self._shared_grant(tokens)
        if grant is None:
            asked = self._clock()
            limit = self.budget.spendable
            if self._ledger is not None:
                limit = max(1, limit // max(2, self._sharers))
            grant = self._own.claim(self._bucket, self._claimer, tokens=tokens, limit=limit,
                                    span_s=self._span_s)
        self.claims += 1
        if grant.tokens:
            # held from when they were asked for: never spent later than the ledger counts
            self._held, self._held_until = grant.tokens, asked + HOLD_S
            return 0.0
        wait = max(grant.wait_s, _MIN_WAIT_S)
        self._refused_until = self._clock() + wait
        self._short_until = self._refused_until + self.budget.window_s
        return wait

    def _share(self, *, claimers: int) -> int:
        """This client's share of what the budget allows in a ``HOLD_S`` (rule 6)."""
        budget = self.budget
        return int(budget.spendable * HOLD_S // (budget.window_s * max(2, claimers)))

    def _ahead(self, now: float) -> int:
        """How many tokens a claim at ``now`` asks for at least (rule 6)."""
        taken = self._taken
        while taken and taken[0] <= now - HOLD_S:
            taken.popleft()
        if self.short:
            return 0
        return min(len(taken), self._share(claimers=self._sharers))

    async def _shared_grant(self, tokens: int) -> BudgetGrant | None:
        """The shared ledger's grant, or None without one (none given, or unavailable)."""
        if self._ledger is None or self._clock() < self._ledger_retry_at:
            return None
        try:
            async with asyncio.timeout(CLAIM_TIMEOUT_S):
                grant = await self._ledger.claim_budget(
                    self._bucket, self._claimer, tokens=tokens, limit=self.budget.spendable,
                    span_s=self._span_s)
        # Whatever keeps the shared ledger from answering (down, locked, a lost connection),
        # the calls go on at a conservative share of the budget (rule 3).
        except Exception as exc:
            log.warning("%s: the shared request budget is unavailable (%s: %s); pacing to a "
                        "local share", self._bucket, type(exc).__name__, exc)
            self._ledger_retry_at = self._clock() + LEDGER_RETRY_S
            return None
        self._sharers = grant.claimers
        # remembered here too, so that a local share later counts what was spent meanwhile
        self._own.record(self._bucket, self._claimer, tokens=grant.tokens, span_s=self._span_s)
        return grant
