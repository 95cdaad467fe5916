"""Service protection limits, per client, over a sliding window (Dataverse's three measures).

- number of requests (default 6000 per 300 s): ``0x80072322``;
- combined execution time (default 1,200,000 ms per 300 s): ``0x80072321``;
- concurrent requests (default 52): ``0x80072326``, which errors at once.

The first two are checked before a request starts, so they may be overshot by the requests
already running, as the real ones can. A ``$batch`` counts as one request, as the real service
counts requests (its operations are not counted separately). Throttled requests are not counted.
Every response carries ``x-ms-ratelimit-burst-remaining-xrm-requests`` and
``x-ms-ratelimit-time-remaining-xrm-requests``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from .protocol import CONCURRENCY_LIMIT, EXECUTION_TIME_LIMIT, REQUESTS_LIMIT, ApiError


@dataclass
class ServiceLimits:
    requests: int = 6000
    execution_time_ms: int = 1_200_000
    window_s: float = 300.0
    concurrent: int = 52

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_body(cls, body: dict[str, Any], base: ServiceLimits) -> ServiceLimits:
        fields = base.describe()
        unknown = set(body) - set(fields)
        if unknown:
            raise ValueError(f"unknown limit fields: {sorted(unknown)}")
        fields.update(body)
        return cls(requests=int(fields["requests"]),
                   execution_time_ms=int(fields["execution_time_ms"]),
                   window_s=float(fields["window_s"]), concurrent=int(fields["concurrent"]))


@dataclass
class _Usage:
    starts: deque[float] = field(default_factory=deque)
    runs: deque[tuple[float, float]] = field(default_factory=deque)  # (end time, ms)
    run_ms: float = 0.0
    in_flight: int = 0


class Limiter:
    def __init__(self, limits: ServiceLimits) -> None:
        self.limits = limits
        self._usage: dict[str, _Usage] = {}

    def reset(self) -> None:
        self._usage.clear()

    def _expire(self, usage: _Usage, now: float) -> None:
        cutoff = now - self.limits.window_s
        while usage.starts and usage.starts[0] <= cutoff:
            usage.starts.popleft()
        while usage.runs and usage.runs[0][0] <= cutoff:
            usage.run_ms -= usage.runs.popleft()[1]

    def begin(self, client: str, now: float) -> None:
        """Admit a request or raise the 429 ApiError."""
        lim = self.limits
        usage = self._usage.setdefault(client, _Usage())
        self._expire(usage, now)
        if usage.in_flight >= lim.concurrent:
            raise self._throttled(CONCURRENCY_LIMIT, "Number of concurrent requests exceeded the "
                                  f"limit of {lim.concurrent}.", 1)
        if len(usage.starts) >= lim.requests:
            wait = usage.starts[0] + lim.window_s - now
            raise self._throttled(
                REQUESTS_LIMIT, f"Number of requests exceeded the limit of {lim.requests} over "
                f"time window of {_seconds(lim.window_s)} seconds.", wait)
        if usage.run_ms > lim.execution_time_ms:
            wait = usage.runs[0][0] + lim.window_s - now if usage.runs else 1
            raise self._throttled(
                EXECUTION_TIME_LIMIT, "Combined execution time of incoming requests exceeded "
                f"limit of {lim.execution_time_ms:,}  milliseconds over time window of "
                f"{_seconds(lim.window_s)} seconds. Decrease number of concurrent requests or "
                "reduce the duration of requests and try again later.", wait)
        usage.starts.append(now)
        usage.in_flight += 1

    def end(self, client: str, started: float, now: float) -> None:
        usage = self._usage[client]
        usage.in_flight -= 1
        ms = (now - started) * 1000.0
        usage.runs.append((now, ms))
        usage.run_ms += ms

    def headers(self, client: str) -> dict[str, str]:
        usage = self._usage.get(client) or _Usage()
        return {
            "x-ms-ratelimit-burst-remaining-xrm-requests":
                str(max(0, self.limits.requests - len(usage.starts))),
            "x-ms-ratelimit-time-remaining-xrm-requests":
                f"{max(0.0, self.limits.execution_time_ms - usage.run_ms):.2f}",
        }

    @staticmethod
    def _throttled(code: str, message: str, wait: float) -> ApiError:
        retry = max(1, math.ceil(wait))
        return ApiError(429, code, message, {"Retry-After": str(retry)})


def _seconds(window: float) -> str:
    return str(int(window)) if window == int(window) else str(window)
