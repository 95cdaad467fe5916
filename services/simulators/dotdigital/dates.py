"""Dates as dotdigital writes and reads them: UTC, ISO-8601, millisecond precision.

Stored times are integers (milliseconds since the epoch, UTC) so indexes compare them cheaply.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from functools import lru_cache

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Every form real clients put in v2 path segments: a bare date, or a date-time with optional
# seconds and fraction, and ``Z``, ``+00:00``, ``+0000`` or no zone (UTC). ``%2B`` arrives here
# already decoded to ``+``.
_PATH_DATE = re.compile(
    r"(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2})"
    r"(?:T(?P<h>\d{2}):(?P<mi>\d{2})(?::(?P<s>\d{2})(?:\.(?P<f>\d{1,7}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:?\d{2})?)?"
)
# The v3 list filters accept exactly this (the published schema's pattern).
_V3_FILTER_DATE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{3})?Z")


def to_ms(moment: datetime) -> int:
    """Milliseconds since the epoch, truncating anything finer."""
    delta = moment.astimezone(UTC) - _EPOCH
    return delta.days * 86_400_000 + delta.seconds * 1000 + delta.microseconds // 1000


@lru_cache(maxsize=1 << 14)
def _second(seconds: int) -> str:
    t = time.gmtime(seconds)
    return (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
            f"T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.")


def format_ms(ms: int) -> str:
    """``2024-05-01T10:00:00.123Z``: UTC, always three fractional digits."""
    seconds, millis = divmod(ms, 1000)
    return f"{_second(seconds)}{millis:03d}Z"


def parse_path_date(text: str) -> int | None:
    """A v2 path date as milliseconds, or None when it is not a date this API accepts.

    A fraction finer than a millisecond is truncated, so a watermark never skips a change stamped
    in the same millisecond.
    """
    match = _PATH_DATE.fullmatch(text)
    if match is None:
        return None
    parts = match.groupdict()
    fraction = (parts["f"] or "").ljust(6, "0")[:6]
    try:
        moment = datetime(int(parts["y"]), int(parts["mo"]), int(parts["d"]),
                          int(parts["h"] or 0), int(parts["mi"] or 0), int(parts["s"] or 0),
                          int(fraction or 0), tzinfo=UTC)
    except ValueError:
        return None
    tz = parts["tz"]
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        digits = tz[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:])
        if hours > 14 or minutes > 59:
            return None
        moment -= sign * timedelta(hours=hours, minutes=minutes)
    return to_ms(moment)


def parse_v3_filter_date(text: str) -> int | None:
    """A v3 ``~modified``/``~created`` date (``YYYY-MM-DDTHH:MM:SS[.fff]Z``), or None."""
    if _V3_FILTER_DATE.fullmatch(text) is None:
        return None
    return parse_path_date(text)
