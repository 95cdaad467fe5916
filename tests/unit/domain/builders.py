"""Small constructors shared by the domain tests."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

from hypothesis import settings

from common.domain import Observation, PreferenceKey, Side

# Fast by default; PREFSYNC_EXAMPLES_SCALE=20 (say) for a long hunt before a release.
_SCALE = float(os.environ.get("PREFSYNC_EXAMPLES_SCALE", "1"))


def examples(n: int) -> settings:
    """Hypothesis settings with ``n`` examples (scaled), no per-example deadline."""
    return settings(max_examples=max(1, int(n * _SCALE)), deadline=None)


KEY = PreferenceKey(account="acme", email="Ann@Example.com", preference_id=1001)
T0 = datetime(2026, 3, 1, 9, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    """``T0`` plus ``seconds`` (milliseconds kept)."""
    return T0 + timedelta(milliseconds=round(seconds * 1000))


def obs(side: Side, opted_in: bool, seconds: float, *, version: int | None = None,
        change_id: str | None = None) -> Observation:
    """An observation at ``T0 + seconds``; Dynamics times are whole seconds like ``modifiedon``."""
    when = at(seconds)
    if side == "dynamics":
        when = when.replace(microsecond=0)
    return Observation(key=KEY, side=side, opted_in=opted_in, origin_time=when, version=version,
                       change_id=change_id or f"{side}:{version if version is not None else when}")
