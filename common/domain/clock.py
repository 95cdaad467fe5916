"""Time rules shared by the sync domain.

Dataverse stamps ``modifiedon`` in whole seconds while dotdigital's ``dateModifed`` has
milliseconds, so a Dynamics change and a dotdigital change inside the same second cannot be
ordered. Cross-change comparisons therefore happen at whole-second precision, and the tie goes
to the opt-out: a tie never opts anyone in.
"""

from __future__ import annotations

from datetime import UTC, datetime


def as_utc(value: datetime) -> datetime:
    """``value`` in UTC; a naive datetime is refused (its zone would be a guess)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("time must carry a time zone (UTC expected)")
    return value.astimezone(UTC)


def whole_second(value: datetime) -> datetime:
    """``value`` truncated to the second (the precision both sides share)."""
    return value.replace(microsecond=0)


def lww_rank(*, origin_time: datetime, opted_in: bool) -> tuple[datetime, int]:
    """Sort key of the last-writer-wins order: later second first, then opt-out over opt-in."""
    return whole_second(origin_time), 0 if opted_in else 1
