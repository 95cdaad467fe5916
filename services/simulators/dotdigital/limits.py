"""Per-account tiered call-rate limits: N calls per minute, counted in fixed one-minute windows.

Every authenticated API call counts against its account (all API users of an account share the
budget). Answers carry ``X-RateLimit-Limit``, ``-Remaining``, ``-Reset`` (seconds until the window
resets, as dotdigital's SDK documents) and ``-Scope`` whenever a limit is set; a spent window is
answered 429. The scope value names the tier; dotdigital's exact spelling is not documented, so
this one is inferred. Windows run on real (monotonic) time, not the simulator clock, so a frozen
clock does not freeze a limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

WINDOW_S = 60.0
SCOPE = "medium"


@dataclass(slots=True)
class _Window:
    started: float
    used: int


@dataclass(frozen=True, kw_only=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int


class CallRateLimits:
    def __init__(self, *, calls_per_minute: int | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.calls_per_minute = calls_per_minute
        self._clock = clock
        self._windows: dict[int, _Window] = {}

    def configure(self, calls_per_minute: int | None) -> None:
        if calls_per_minute is not None and calls_per_minute < 1:
            raise ValueError("calls_per_minute must be at least 1, or null for unlimited")
        self.calls_per_minute = calls_per_minute
        self._windows.clear()

    def load(self, body: Mapping[str, Any]) -> None:
        """``PUT /_sim/limits``: ``{"calls_per_minute": n}`` (null: unlimited)."""
        raw = body.get("calls_per_minute")
        if raw is not None and (isinstance(raw, bool) or not isinstance(raw, int)):
            raise ValueError("calls_per_minute must be an integer or null")
        self.configure(raw)

    def reset(self) -> None:
        self._windows.clear()

    def spend(self, account_id: int) -> Verdict | None:
        """Counts one call; None when the account is unlimited."""
        limit = self.calls_per_minute
        if limit is None:
            return None
        now = self._clock()
        window = self._windows.get(account_id)
        if window is None or now - window.started >= WINDOW_S:
            window = self._windows[account_id] = _Window(started=now, used=0)
        reset_s = max(1, math.ceil(window.started + WINDOW_S - now))
        if window.used >= limit:
            return Verdict(allowed=False, limit=limit, remaining=0, reset_s=reset_s)
        window.used += 1
        return Verdict(allowed=True, limit=limit, remaining=limit - window.used, reset_s=reset_s)

    def describe(self) -> dict[str, object]:
        return {"calls_per_minute": self.calls_per_minute, "window_s": WINDOW_S, "scope": SCOPE}
