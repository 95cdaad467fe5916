"""Pure pieces of the dotdigital simulator: dates and the slot index."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.simulators.dotdigital.dates import format_ms, parse_path_date, parse_v3_filter_date
from services.simulators.dotdigital.slotindex import SlotIndex


def test_path_dates_parse_to_utc_milliseconds() -> None:
    base = parse_path_date("2024-01-01T10:00:00Z")
    assert base is not None
    assert format_ms(base) == "2024-01-01T10:00:00.000Z"
    assert parse_path_date("2024-01-01T11:30:00+01:30") == base
    assert parse_path_date("2024-01-01T05:00:00-0500") == base
    assert parse_path_date("2024-01-01T10:00:00.1239999") == base + 123  # finer is truncated
    assert parse_path_date("2024-01-01") == base - 10 * 3_600_000
    assert parse_path_date("2024-02-30") is None
    assert parse_path_date("2024-01-01T10:00:00+15:00") is None
    assert parse_path_date("2024-01-01 10:00:00") is None


def test_v3_filter_dates_follow_the_published_pattern() -> None:
    assert parse_v3_filter_date("2024-01-01T10:00:00Z") == parse_path_date("2024-01-01T10:00:00Z")
    assert parse_v3_filter_date("2024-01-01T10:00:00.250Z") is not None
    for bad in ("2024-01-01", "2024-01-01T10:00:00+00:00", "2024-01-01T10:00Z",
                "2024-01-01T10:00:00.25Z"):
        assert parse_v3_filter_date(bad) is None


operations = st.lists(st.tuples(st.sampled_from(["set", "append"]),
                                st.integers(0, 10_000), st.integers(-1, 50)), max_size=300)


@settings(max_examples=60, deadline=None)
@given(initial=st.lists(st.integers(-1, 50), max_size=9000), ops=operations,
       start=st.integers(0, 10_000), threshold=st.integers(-1, 51),
       limit=st.integers(1, 9000))
def test_slot_walk_matches_a_plain_scan(initial: list[int], ops: list[tuple[str, int, int]],
                                        start: int, threshold: int, limit: int) -> None:
    index = SlotIndex(initial)
    plain = list(initial)
    for op, where, value in ops:
        if op == "append" or not plain:
            index.append(value)
            plain.append(value)
        else:
            index.set(where % len(plain), value)
            plain[where % len(plain)] = value
    expected = [i for i in range(start, len(plain)) if plain[i] >= threshold][:limit]
    assert index.slots_at_least(start, threshold, limit) == expected
    filled = SlotIndex.filled(len(plain))
    for i, value in enumerate(plain):
        filled.set(i, value)
    assert filled.slots_at_least(start, threshold, limit) == expected
