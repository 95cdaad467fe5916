"""Small statistics over repeated measurements, and call counts from the simulators' counters."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def median(values: Iterable[float]) -> float:
    items = list(values)
    return statistics.median(items) if items else float("nan")


def percentile(weighted: Sequence[tuple[float, int]], fraction: float) -> float | None:
    """The value below which ``fraction`` of the weight lies (nearest rank); ``weighted`` holds
    (value, weight) pairs, e.g. (latency, writes reported with it)."""
    total = sum(w for _, w in weighted)
    if total <= 0:
        return None
    rank = fraction * total
    seen = 0
    for value, weight in sorted(weighted):
        seen += weight
        if seen >= rank:
            return value
    return max(v for v, _ in weighted)


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def call_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, int]:
    """HTTP requests per ``"<METHOD> <route>"`` made between two ``GET /_sim/stats`` answers
    (operations inside a ``$batch`` are not requests of their own: see ``batched_delta``)."""
    old = before.get("calls", {})
    new = after.get("calls", {})
    old_in = before.get("in_batches", {})
    new_in = after.get("in_batches", {})
    out = {}
    for route, count in new.items():
        made = (count - old.get(route, 0)) - (new_in.get(route, 0) - old_in.get(route, 0))
        if made > 0:
            out[route] = made
    return out


def batched_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, int]:
    """Operations inside ``$batch`` requests between two ``GET /_sim/stats`` answers."""
    old = before.get("in_batches", {})
    new = after.get("in_batches", {})
    return {route: count - old.get(route, 0) for route, count in new.items()
            if count - old.get(route, 0) > 0}


def status_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, int]:
    old = before.get("statuses", {})
    new = after.get("statuses", {})
    return {status: count - old.get(status, 0) for status, count in new.items()
            if count - old.get(status, 0) > 0}


def write_calls(calls: Mapping[str, int]) -> int:
    return sum(n for route, n in calls.items() if route.split(" ", 1)[0] in WRITE_METHODS)


def read_calls(calls: Mapping[str, int]) -> int:
    return sum(n for route, n in calls.items() if route.split(" ", 1)[0] not in WRITE_METHODS)
