"""Where the ec-poller's contacts-modified read starts (:mod:`common.vendors.dotdigital.modified`):
over any run times, every modification is read by a read that began an overlap or more after
it (so dotdigital surely listed it), within about twice the overlap and a gap between runs, from
a ledger that kept ``covered`` or from one written before it was kept; and runs an overlap or
more apart read the overlap each time, as before. A crash between saving ``covered`` and
``since`` leaves a position that still reads what it must."""

from __future__ import annotations

from datetime import datetime, timedelta
from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from common.vendors.dotdigital.modified import (
    ModifiedPosition,
    modified_read_from,
    position_after,
)
from tests.unit.domain.builders import T0

OVERLAP = timedelta(seconds=30)


def runs_of(gaps: list[float], *, overlap: timedelta = OVERLAP, kept: bool = True,
            crashes: frozenset[int] = frozenset()) -> list[tuple[datetime, datetime, bool]]:
    """Each run's start, where its read started and whether it was full, for runs ``gaps``
    seconds apart, as the ec-poller keeps its checkpoints: after a first run (which reads
    nothing: its feeds read from the beginning), or (``kept`` off) from a ledger that holds
    the first run's start alone. The runs numbered in ``crashes`` die after saving ``covered``,
    before ``since`` (rule 6)."""
    started = T0
    position = position_after(None, started=started, full=True, overlap=overlap)
    if not kept:
        position = ModifiedPosition(since=started)
    runs = [(started, started, True)]
    for gap in gaps:
        started += timedelta(seconds=gap)
        read_from, full = modified_read_from(position, started=started, overlap=overlap)
        # (after a crash between the two saves, ``covered`` may be past ``since``)
        assert read_from <= position.since or read_from == position.covered
        runs.append((started, read_from, full))
        after = position_after(position, started=started, full=full, overlap=overlap)
        position = (ModifiedPosition(since=position.since, covered=after.covered)
                    if len(runs) - 1 in crashes else after)
    return runs


@given(st.lists(st.floats(min_value=0.5, max_value=120.0), min_size=1, max_size=60),
       st.floats(min_value=0.0, max_value=1.0), st.booleans(),
       st.frozensets(st.integers(min_value=1, max_value=60), max_size=5))
def test_every_modification_is_read_once_surely_listed_within_twice_the_overlap(
        gaps: list[float], place: float, kept: bool, crashes: frozenset[int]) -> None:
    runs = runs_of(gaps, kept=kept, crashes=crashes)
    # a modification after the first run's feeds, early enough for a later run to see
    last_start = runs[-1][0]
    span = (last_start - (T0 - OVERLAP)).total_seconds()
    modified = T0 - OVERLAP + timedelta(seconds=span * place)
    reading = [started for started, read_from, _ in runs[1:]
               if read_from <= modified and started >= modified + OVERLAP]
    bound = 3 * OVERLAP + 2 * timedelta(seconds=max(gaps))
    if modified + bound <= last_start:
        assert reading, (modified, runs)
        assert reading[0] - modified <= bound, (modified, reading[0], runs)


@given(st.lists(st.floats(min_value=30.0, max_value=3600.0), min_size=1, max_size=20))
def test_runs_an_overlap_apart_each_read_the_overlap(gaps: list[float]) -> None:
    runs = runs_of(gaps)
    for (before, _, _), (_, read_from, full) in pairwise(runs):
        assert full and read_from == before - OVERLAP


def test_a_sync_every_five_seconds_reads_the_overlap_one_run_in_six() -> None:
    runs = runs_of([5.0] * 70)
    assert [n for n, (_, _, full) in enumerate(runs) if full][1:] == list(range(6, 71, 6))
    short = [(started, read_from) for started, read_from, full in runs[1:] if not full]
    assert all(started - read_from == timedelta(seconds=5) for started, read_from in short)


def test_a_ledger_holding_the_start_alone_reads_on_as_if_that_read_was_full() -> None:
    runs = runs_of([5.0] * 13, kept=False)
    assert [n for n, (_, _, full) in enumerate(runs) if full][1:] == [6, 12]


def test_without_an_overlap_every_read_starts_where_the_previous_began() -> None:
    runs = runs_of([5.0, 1.0, 90.0], overlap=timedelta(0))
    assert [read_from for _, read_from, _ in runs[1:]] == [started for started, _, _ in runs[:-1]]
