"""Backoff and circuit breakers: how a consumer waits out a dependency that is down.

A transient failure (:func:`common.messaging.resilience.dependency_of` names the dependency) opens that
dependency's breaker in the process's registry. While a breaker is open:

1. one consumer at a time probes: it retries its batch when the breaker's backoff says so
   (exponential, full jitter: a random delay up to ``base_s * 2**failures``, capped at
   ``cap_s``); a failed probe doubles the next delay;
2. every other consumer whose handler met the same outage waits for the breaker to close (or
   for its own turn to probe) instead of calling the dependency again;
3. a success of any consumer that met the outage closes the breaker (a probe, or the first
   try of a batch it gave back and got again) and wakes every waiting consumer;
4. a breaker that no consumer waits for any more (they stopped: their queues went to another
   replica) closes too: nothing here says the dependency is down;
5. ``/readyz`` answers 503 naming the open dependency, and ``prefsync_dependency_up`` is 0.

The registry in use is a context variable (:func:`use_breakers`), so the services one
``run_services`` call starts share one registry, and tests running several in one process keep
theirs apart. Waits never use loop-bound primitives created before the loop: a breaker outlives
event loops in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

from common.messaging.resilience import DEPENDENCIES, Dependency

log = logging.getLogger("prefsync.breakers")
T = TypeVar("T")

# Backoff of in-place retries: from half a second, doubling, to half a minute.
BASE_S = 0.5
CAP_S = 30.0
# How long a consumer holds a batch it cannot process before it gives it back to the queue
# (well below RabbitMQ's 30-minute consumer timeout, which would close the channel).
HOLD_S = 600.0
# In-place attempts of a single message whose handler keeps failing for an unknown reason.
UNKNOWN_ATTEMPTS = 3


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """How a consumer retries: backoff bounds, the hold bound and the unknown-error attempts."""

    base_s: float = BASE_S
    cap_s: float = CAP_S
    hold_s: float = HOLD_S
    unknown_attempts: int = UNKNOWN_ATTEMPTS

    def delay(self, failures: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**failures)]."""
        ceiling = min(self.cap_s, self.base_s * (2 ** min(failures, 32)))
        return random.uniform(0.0, ceiling)

    async def until_done(self, step: Callable[[], Awaitable[T]], *,
                         waits_out: Callable[[BaseException], bool], what: str) -> T:
        """``step``, tried again after each failure that ``waits_out`` says will pass (a
        dependency down, restarting, a connection lost), with this policy's backoff; any other
        failure is raised. For what a long-running service must get through before (or while)
        it works: a connection, a ledger to open, a queue to follow."""
        failures = 0
        while True:
            try:
                return await step()
            except Exception as exc:
                if not waits_out(exc):
                    raise
                delay = self.delay(failures)
                failures += 1
                log.warning("%s: %s; trying again in %.1f s", what,
                            str(exc) or type(exc).__name__, delay)
                await asyncio.sleep(delay)


StateObserver = Callable[[Dependency, bool], None]


class CircuitBreaker:
    """One dependency's breaker: closed (up) or open (down, probed with backoff)."""

    def __init__(self, dependency: Dependency, *, on_change: Callable[[CircuitBreaker], None]
                 ) -> None:
        self.dependency: Dependency = dependency
        self.reason = ""
        self._open = False
        self._failures = 0
        self._next_probe = 0.0
        self._probing = False
        self._waiters: set[asyncio.Future[None]] = set()
        self._on_change = on_change
        # who met the outage and has not seen the dependency work since
        self._claims: set[object] = set()

    @property
    def is_open(self) -> bool:
        return self._open

    def failed(self, reason: str, *, probe: bool, policy: RetryPolicy,
               claimant: object = None) -> None:
        """A call needing this dependency failed. ``probe``: it was this breaker's probe;
        ``claimant``: who made it (it closes the breaker by a success, or by :meth:`leave`)."""
        now = _now()
        self.reason = reason[:300]
        self._claims.add(claimant)
        if not self._open:
            self._open = True
            self._failures = 0
            self._probing = False
            self._next_probe = now + policy.delay(0)
            log.warning("dependency down: %s (%s)", self.dependency, self.reason)
            self._on_change(self)
        elif probe:
            self._failures += 1
            self._probing = False
            self._next_probe = now + policy.delay(self._failures)
        self._wake()

    def take_probe(self) -> bool:
        """Whether the caller may probe now (then it must end with :meth:`succeeded`,
        :meth:`failed` with ``probe=True`` or :meth:`abandon_probe`)."""
        if self._open and not self._probing and _now() >= self._next_probe:
            self._probing = True
            return True
        return False

    def abandon_probe(self) -> None:
        """The probe ended without telling (cancelled, or it failed on something else)."""
        if self._probing:
            self._probing = False
            self._wake()

    def succeeded(self) -> None:
        """A call that had met the outage succeeded: the dependency is back."""
        self._close("dependency back: %s")

    def leave(self, claimant: object) -> None:
        """``claimant`` no longer waits for this dependency (it stopped)."""
        self._claims.discard(claimant)
        if self._open and not self._claims and not self._probing:
            self._close("no consumer waits for %s any more")

    def _close(self, message: str) -> None:
        self._probing = False
        self._claims.clear()
        if self._open:
            self._open = False
            self._failures = 0
            log.warning(message, self.dependency)
            self._on_change(self)
        self._wake()

    async def wait(self, *, until: float) -> None:
        """Until the breaker closes, a probe may start, or the loop time ``until``."""
        if not self._open:
            return
        now = _now()
        wake_at = until if self._probing else min(until, self._next_probe)
        if wake_at <= now:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, timeout=wake_at - now)
        finally:
            self._waiters.discard(waiter)

    def _wake(self) -> None:
        for waiter in list(self._waiters):
            if not waiter.done():
                with contextlib.suppress(RuntimeError):  # its loop is gone (tests)
                    waiter.set_result(None)
        self._waiters.clear()


class Breakers:
    """The registry: one breaker per dependency, and who is told when one opens or closes."""

    def __init__(self) -> None:
        self._breakers = {d: CircuitBreaker(d, on_change=self._changed) for d in DEPENDENCIES}
        self._observers: list[StateObserver] = []

    def __getitem__(self, dependency: Dependency) -> CircuitBreaker:
        return self._breakers[dependency]

    def __iter__(self) -> Iterator[CircuitBreaker]:
        return iter(self._breakers.values())

    def down(self) -> dict[str, str]:
        """Each open dependency and the failure that opened it (or last failed its probe)."""
        return {b.dependency: b.reason for b in self if b.is_open}

    def observe(self, observer: StateObserver) -> None:
        """Call ``observer(dependency, up)`` now for every dependency and on every change."""
        self._observers.append(observer)
        for breaker in self:
            observer(breaker.dependency, not breaker.is_open)

    def _changed(self, breaker: CircuitBreaker) -> None:
        for observer in self._observers:
            try:
                observer(breaker.dependency, not breaker.is_open)
            except Exception:  # an observer must never break consuming
                log.exception("breaker observer failed")


# The process's registry, for whatever runs outside ``use_breakers`` (tools, tests).
PROCESS_BREAKERS = Breakers()
_current: ContextVar[Breakers | None] = ContextVar("prefsync_breakers", default=None)


def current_breakers() -> Breakers:
    return _current.get() or PROCESS_BREAKERS


def use_breakers(breakers: Breakers) -> None:
    """Make ``breakers`` the registry of this task and of the tasks it starts from now on."""
    _current.set(breakers)


def _now() -> float:
    return asyncio.get_running_loop().time()
