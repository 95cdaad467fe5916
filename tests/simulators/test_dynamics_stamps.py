"""Dataverse simulator: the whole-second stamps of writes (``Writes._stamp_time``).

A write's ``createdon``/``modifiedon`` is the clock truncated to whole seconds. The stamp is
kept for the second it names and handed out again while the clock stays in that second; it
must always equal the clock's reading truncated, whichever way the clock moves.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from services.simulators.base import SimClock
from services.simulators.dynamics.store import Store
from services.simulators.dynamics.writes import Writes


class _Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at


def test_stamps_are_the_clock_truncated_to_whole_seconds() -> None:
    clock = _Clock(datetime(2026, 12, 4, 12, 0, 0, 250_000, tzinfo=UTC))
    writes = Writes(Store(), clock.now)
    steps = [timedelta(microseconds=700_000), timedelta(microseconds=49_999),
             timedelta(microseconds=1), timedelta(seconds=-1), timedelta(microseconds=-1),
             timedelta(hours=3, microseconds=999_999), timedelta(0), timedelta(seconds=-7200)]
    first = writes._stamp_time()
    assert first == datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)
    for step in steps:
        clock.at += step
        assert writes._stamp_time() == clock.at.replace(microsecond=0), clock.at
        assert writes._stamp_time().microsecond == 0


def test_a_stamp_is_handed_out_again_within_its_second_only() -> None:
    clock = _Clock(datetime(2026, 12, 4, 12, 0, 0, 100, tzinfo=UTC))
    writes = Writes(Store(), clock.now)
    first = writes._stamp_time()
    clock.at += timedelta(microseconds=999_000)
    assert writes._stamp_time() is first
    clock.at += timedelta(microseconds=900)  # 12:00:01.000000
    assert writes._stamp_time() == datetime(2026, 12, 4, 12, 0, 1, tzinfo=UTC)


def test_a_clock_in_another_zone_is_truncated_in_its_own() -> None:
    zone = timezone(timedelta(hours=5, minutes=30))
    clock = _Clock(datetime(2026, 12, 4, 12, 0, 0, 600_000, tzinfo=UTC))
    writes = Writes(Store(), clock.now)
    writes._stamp_time()
    clock.at = clock.at.astimezone(zone)
    stamp = writes._stamp_time()
    assert stamp == clock.at.replace(microsecond=0) and stamp.tzinfo is zone


def test_the_simulators_clock_stamps_its_reading_truncated_however_it_runs() -> None:
    # while the clock runs neither frozen nor shifted, a stamp within the last second stamped
    # is told by the system time: it must still be the clock's reading truncated, also across
    # whole seconds and once the clock is frozen, shifted or set back to run again
    clock = SimClock()
    writes = Writes(Store(), clock.now, clock=clock)
    seconds = set()
    deadline = datetime.now(UTC) + timedelta(seconds=2.2)
    while datetime.now(UTC) < deadline:  # (two whole seconds passed at least)
        before = clock.now().replace(microsecond=0)
        stamp = writes._stamp_time()
        after = clock.now().replace(microsecond=0)
        assert before <= stamp <= after and stamp.microsecond == 0 and stamp.tzinfo is UTC
        again = writes._stamp_time()  # (the same stamp, unless its second has passed)
        assert again is stamp or stamp < again <= clock.now().replace(microsecond=0)
        seconds.add(stamp)
    assert len(seconds) >= 3
    for setting in [{"freeze_at": datetime(2026, 12, 4, 12, 0, 0, 500_000, tzinfo=UTC)},
                    {"offset_s": -3600.5}, {}, {"offset_s": 86_400.0},
                    {"freeze_at": datetime.now(UTC) + timedelta(microseconds=1)}, {}]:
        clock.set(**setting)  # type: ignore[arg-type]
        before = clock.now().replace(microsecond=0)
        stamp = writes._stamp_time()
        assert before <= stamp <= clock.now().replace(microsecond=0), setting
