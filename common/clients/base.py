"""What both vendor clients share: typed vendor errors, the one retry policy, and pacing.

Pacing keeps a client inside its configured request budget (a leaky bucket from aiolimiter) and
a concurrency cap; when the vendor says to wait (``Retry-After``, ``X-RateLimit-Reset``) every
request of that client waits, not only the one that was refused.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from aiolimiter import AsyncLimiter

T = TypeVar("T")


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
    """The vendor's rate limit answered 429 and retries ran out."""


class TransportError(Exception):
    """The vendor could not be reached (connection refused, reset, timed out)."""

    def __init__(self, *, vendor: str, detail: str) -> None:
        super().__init__(f"{vendor} unreachable: {detail}")
        self.vendor = vendor
        self.detail = detail
        self.retryable = True


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Retries for 429, 5xx and connection errors only, with full-jitter exponential backoff.

    A 429 waits what the vendor asked (``retry_after``) plus a little jitter, bounded by
    ``max_retry_after_s``; it does not use up the attempts meant for failures.
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
    ) -> T:
        failures = 0
        throttled = 0
        while True:
            try:
                return await call()
            except VendorError as exc:
                if exc.status == 429 and throttled < self.max_throttled_waits:
                    throttled += 1
                    wait = min(exc.retry_after if exc.retry_after is not None
                               else self.backoff(throttled), self.max_retry_after_s)
                    if on_throttled is not None:
                        on_throttled(wait)
                    await asyncio.sleep(wait + random.uniform(0, 0.05))
                    continue
                if not exc.retryable or exc.status == 429 or failures + 1 >= self.attempts:
                    raise
            except TransportError:
                if failures + 1 >= self.attempts:
                    raise
            failures += 1
            await asyncio.sleep(self.backoff(failures))


class Pacer:
    """Keeps one client inside its request budget and concurrency cap, and honours pauses."""

    def __init__(self, *, max_requests: int, per_seconds: float, max_concurrency: int) -> None:
        self._limiter = AsyncLimiter(max_requests, per_seconds)
        self._concurrency = asyncio.Semaphore(max_concurrency)
        self._paused_until = 0.0
        self.waited_s = 0.0

    def pause_for(self, seconds: float) -> None:
        """Every request of this client waits until ``seconds`` from now have passed."""
        self._paused_until = max(self._paused_until, time.monotonic() + max(0.0, seconds))

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._concurrency:
            while (delay := self._paused_until - time.monotonic()) > 0:
                self.waited_s += delay
                await asyncio.sleep(delay)
            started = time.monotonic()
            await self._limiter.acquire()
            self.waited_s += time.monotonic() - started
            yield
