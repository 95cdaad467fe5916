"""Sync schedules: ``manual``, ``every <interval>`` and ``daily HH:MM <time zone>``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_EVERY = re.compile(r"^every\s+(\d+)\s*([smhd])$")
_DAILY = re.compile(r"^daily\s+(\d{1,2}):(\d{2})(?:\s+(\S+))?$")


@dataclass(frozen=True, kw_only=True)
class Manual:
    def next_run(self, after: datetime) -> datetime | None:
        return None

    def __str__(self) -> str:
        return "manual"


@dataclass(frozen=True, kw_only=True)
class Every:
    interval: timedelta

    def next_run(self, after: datetime) -> datetime | None:
        return after + self.interval

    def __str__(self) -> str:
        return f"every {int(self.interval.total_seconds())}s"


@dataclass(frozen=True, kw_only=True)
class Daily:
    at: time
    zone: ZoneInfo

    def next_run(self, after: datetime) -> datetime | None:
        local = after.astimezone(self.zone)
        candidate = datetime.combine(local.date(), self.at, tzinfo=self.zone)
        if candidate <= local:
            candidate = datetime.combine(local.date() + timedelta(days=1), self.at, tzinfo=self.zone)
        return candidate

    def __str__(self) -> str:
        return f"daily {self.at:%H:%M} {self.zone.key}"


Schedule = Manual | Every | Daily


def parse_schedule(text: str) -> Schedule:
    value = " ".join(text.strip().split())
    if value == "manual":
        return Manual()
    if m := _EVERY.match(value):
        seconds = int(m.group(1)) * _UNITS[m.group(2)]
        if seconds < 1:
            raise ValueError(f"{text!r}: the interval must be at least one second")
        return Every(interval=timedelta(seconds=seconds))
    if m := _DAILY.match(value):
        hour, minute = int(m.group(1)), int(m.group(2))
        if hour > 23 or minute > 59:
            raise ValueError(f"{text!r}: {hour:02d}:{minute:02d} is not a time of day")
        zone_name = m.group(3) or "UTC"
        try:
            zone = ZoneInfo(zone_name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{text!r}: unknown time zone {zone_name!r}") from None
        return Daily(at=time(hour, minute), zone=zone)
    raise ValueError(
        f"{text!r} is not a schedule: use 'manual', 'every 30m' (s, m, h, d) "
        "or 'daily 02:00 Europe/London'"
    )
