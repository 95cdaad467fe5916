"""What both vendor clients share: typed vendor errors, the one retry policy, pacing, and the
per-request observation event.

Pacing keeps a client inside its configured request budget and a concurrency cap; when the
vendor says to wait (``Retry-After``, ``X-RateLimit-Reset``) every request of that client waits,
not only the one that was refused.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar

from aiolimiter import AsyncLimiter

T = TypeVar("T")

# A wait header above this is a Unix epoch (when to retry), below it a number of seconds.
_EPOCH_THRESHOLD = 1_000_000_000


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
    """The client is paused (the vendor asked it to wait) beyond the call's deadline."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(f"paused for {wait_s:.1f} s more")
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
    """The newest clock readings a client took, until someone takes them (bounded)."""

    def __init__(self, *, keep: int = 8) -> None:
        self._readings: deque[ClockReading] = deque(maxlen=keep)

    def add(self, reading: ClockReading) -> None:
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

        def past_deadline(wait: float) -> bool:
            return deadline is not None and time.monotonic() + wait > deadline

        while True:
            try:
                return await call()
            except VendorError as exc:
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
                delay = self.backoff(failures + 1)
                if past_deadline(delay):
                    raise
            failures += 1
            await asyncio.sleep(delay)


@dataclass
class _VendorWindow:
    """The vendor's current rate-limit window, as its answers report it."""

    ends: float  # time.monotonic() when it resets (never earlier than it does)
    remaining: int  # calls left in it, as far as this client knows
    used: int  # calls this client sent in it


class Pacer:
    """Keeps one client inside its request budget and concurrency cap, and honours pauses.

    Without word from the vendor the budget holds over any sliding window of ``per_seconds``:
    the leaky bucket allows a small burst (a tenth of the budget at most) and leaks the rest
    evenly, so burst plus steady flow never exceeds ``max_requests`` in one window, whatever the
    vendor's window alignment. Once the vendor's answers say how many calls remain in its window
    and when the window resets (``observe_budget``), the client spends up to ``max_requests``
    in that window, never more than remain, and then waits for the reset: with a vendor that
    counts in fixed windows, that is the whole budget of every window instead of the leaked
    share (about a tenth more calls a minute at 35), and still no call it knows would be refused.
    """

    def __init__(self, *, max_requests: int, per_seconds: float, max_concurrency: int) -> None:
        if max_requests < 1 or per_seconds <= 0 or max_concurrency < 1:
            raise ValueError("Pacer needs max_requests >= 1, per_seconds > 0, max_concurrency >= 1")
        burst = max(1, min(max_requests // 10, max_concurrency))
        steady = max_requests - burst if max_requests > burst else max_requests
        self.burst = burst
        self.rate_per_s = steady / per_seconds
        self._max_requests = max_requests
        self._limiter = AsyncLimiter(burst, burst / self.rate_per_s)
        self._concurrency = asyncio.Semaphore(max_concurrency)
        self._paused_until = 0.0
        self._window: _VendorWindow | None = None
        self.waited_s = 0.0

    def observe_budget(self, *, remaining: int, reset_s: float) -> None:
        """An answer's word on the vendor's window: ``remaining`` calls left in it, and it
        resets ``reset_s`` from now (a count of whole seconds, rounded up)."""
        now = time.monotonic()
        ends = now + max(0.0, reset_s)
        window = self._window
        if window is None or now >= window.ends or ends > window.ends + 2.0:
            self._window = _VendorWindow(ends=ends, remaining=remaining, used=1)
        else:  # the same window: answers may arrive out of order, the lowest count is newest
            window.remaining = min(window.remaining, remaining)
            window.ends = min(window.ends, ends)

    def pause_for(self, seconds: float) -> None:
        """Every request of this client waits until ``seconds`` from now have passed."""
        self._paused_until = max(self._paused_until, time.monotonic() + max(0.0, seconds))

    @property
    def paused_for(self) -> float:
        return max(0.0, self._paused_until - time.monotonic())

    @asynccontextmanager
    async def slot(self, *, deadline: float | None = None) -> AsyncIterator[float]:
        """Hold one request slot; yields the seconds this request spent in a vendor pause.

        A pause that would last past ``deadline`` (``time.monotonic()``) raises
        :class:`PausedPastDeadline` instead of being waited out."""
        async with self._concurrency:
            paused = 0.0
            while (delay := self._paused_until - time.monotonic()) > 0:
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise PausedPastDeadline(delay)
                paused += delay
                await asyncio.sleep(delay)
            started = time.monotonic()
            await self._spend()
            self.waited_s += paused + time.monotonic() - started
            yield paused

    async def _spend(self) -> None:
        while True:
            window = self._window
            now = time.monotonic()
            if window is not None and now >= window.ends:
                self._window = window = None  # reset: unknown again until the next answer
            if window is None:
                await self._limiter.acquire()
                return
            if window.remaining > 0 and window.used < self._max_requests:
                window.remaining -= 1
                window.used += 1
                return
            await asyncio.sleep(window.ends - now)
