from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from common.schedule import Daily, Every, Manual, parse_schedule


def test_manual_never_runs_by_itself() -> None:
    assert parse_schedule("manual").next_run(datetime.now(UTC)) is None
    assert isinstance(parse_schedule(" manual "), Manual)


def test_every_interval() -> None:
    schedule = parse_schedule("every 30m")
    assert isinstance(schedule, Every)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert schedule.next_run(now) == now + timedelta(minutes=30)


def test_daily_in_a_time_zone_across_dst() -> None:
    schedule = parse_schedule("daily 02:00 Europe/London")
    assert isinstance(schedule, Daily)
    # 2026-03-29 is the spring-forward day in London: 02:00 local is 01:00 UTC the day after.
    before = datetime(2026, 3, 29, 12, 0, tzinfo=UTC)
    assert schedule.next_run(before) == datetime(2026, 3, 30, 1, 0, tzinfo=UTC)
    winter = datetime(2026, 1, 10, 1, 0, tzinfo=UTC)
    assert schedule.next_run(winter) == datetime(2026, 1, 10, 2, 0, tzinfo=UTC)


@pytest.mark.parametrize("text", ["hourly", "every 0m", "daily 25:00", "daily 02:00 Mars/Base"])
def test_bad_schedules(text: str) -> None:
    with pytest.raises(ValueError):
        parse_schedule(text)
