"""The ec-poller's checkpoint of a preference's opt-ins feed, as it is stored and as the writer
reads it (common.vendors.dotdigital.feed.FeedPosition); and where each read starts: over any run
times, crashes and reads of the overlap held back for other feeds', every opt-in is read by a
read that started before its stamp once it was listed, within about twice the overlap and a few
gaps between runs."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from common.store.checkpoints import opt_ins_source
from common.vendors.dotdigital.feed import EPOCH, FeedPosition
from common.vendors.dotdigital.overlap import overlap_read_now

T = datetime(2024, 5, 1, 12, tzinfo=UTC)


def test_the_stored_forms_are_unchanged() -> None:
    # Checkpoints written before this codec existed must read the same, and the other way round.
    under_way = '{"since":"2024-05-01T12:00:00+00:00","min_contact_id":42,"markers_owed":true}'
    finished = '{"since":"2024-05-01T12:00:00+00:00","previous":"2024-05-01T11:55:00+00:00"}'
    assert FeedPosition(since=T, min_contact_id=42, markers_owed=True).encode() == under_way
    assert FeedPosition(since=T, previous=T - timedelta(minutes=5)).encode() == finished
    for saved in (under_way, finished):
        assert FeedPosition.decode(saved).encode() == saved
    # and what this release keeps besides reads back as it was
    kept = FeedPosition(since=T, min_contact_id=0, previous=T - OVERLAP, markers_owed=True,
                        last_watermark=T - OVERLAP, covered=T - 2 * OVERLAP,
                        began_at=T.timestamp() + 0.25, reading_from=T - 3 * OVERLAP,
                        reading_since=T + OVERLAP, reading_began_at=T.timestamp() + 30.5)
    assert FeedPosition.decode(kept.encode()) == kept
    assert opt_ins_source(7) == "dotdigital:opt-ins:7"


def test_never_read() -> None:
    position = FeedPosition.decode(None)
    assert position == FeedPosition()
    assert position.watermark is None and position.first_read


def test_a_first_read_under_way_has_no_watermark() -> None:
    position = FeedPosition.decode(FeedPosition(since=EPOCH, min_contact_id=3,
                                                markers_owed=True).encode())
    assert position.watermark is None and position.first_read


def test_a_later_read_under_way_saved_without_the_last_watermark_is_waited_for() -> None:
    position = FeedPosition.decode('{"since":"2024-05-01T12:00:00+00:00","min_contact_id":3}')
    assert position.watermark is None and not position.first_read


def test_a_later_read_under_way_keeps_the_last_complete_reads_watermark() -> None:
    # The writer goes on from there meanwhile, rather than waiting for the read to finish.
    earlier = T - timedelta(minutes=5)
    finished = FeedPosition(since=T, previous=earlier)
    under_way = FeedPosition.decode(FeedPosition(
        since=T, min_contact_id=3, last_watermark=finished.watermark).encode())
    assert under_way.last_watermark == earlier
    assert under_way.watermark == earlier and not under_way.first_read
    # once that read finishes, its own start is the watermark
    assert FeedPosition(since=T + timedelta(seconds=5), previous=T - timedelta(seconds=30)
                        ).watermark == T - timedelta(seconds=30)


def test_the_watermark_is_where_the_last_complete_read_started() -> None:
    earlier = T - timedelta(minutes=5)
    assert FeedPosition(since=T, previous=earlier).watermark == earlier
    # after a first read (it read from EPOCH) there is nothing earlier than its start
    after_first = FeedPosition(since=T, previous=EPOCH)
    assert after_first.watermark == T and not after_first.first_read


# --- where a read starts (common.vendors.dotdigital.overlap) ----------------------------------
OVERLAP = timedelta(seconds=30)


@dataclass(frozen=True)
class FeedRun:
    started: datetime
    read_from: datetime
    full: bool
    # entries listed by then are read by this read (a read resumed after a crash: only those
    # listed by the start of the run it began in, as if every contact was read before the crash)
    listed_by: datetime


def feed_runs(gaps: list[float], *, overlap: timedelta = OVERLAP,
              crashes: frozenset[int] = frozenset(), kept: bool = True,
              held: frozenset[int] = frozenset()) -> list[FeedRun]:
    """Each read of a feed, for runs ``gaps`` seconds apart (our clock and dotdigital's alike),
    after a first read from the beginning, as the ec-poller keeps the feed's position. The
    runs numbered in ``crashes`` die in the middle of their read (a page's checkpoint saved);
    the next run resumes it. ``kept`` off: the first read's position was saved by a release
    that kept no ``covered``. In the runs numbered in ``held``, a read of the overlap that is
    due waits for a later run (another feed's reads it this run: rule 7)."""
    started = T
    position = FeedPosition(since=EPOCH)
    runs: list[FeedRun] = []
    crashed_at: datetime | None = None
    for number, gap in enumerate([0.0, *gaps]):
        started += timedelta(seconds=gap)
        read_from, due = position.next_read(overlap=overlap, now=started.timestamp())
        if due and number in held:
            assert position.since is not None
            read_from = position.since
        if number in crashes and position.min_contact_id is None:
            # a page is read and its checkpoint saved, then the process dies
            position = position.page_read(read_from=read_from, next_contact_id=1,
                                          started=started, began=started.timestamp())
            crashed_at = started
            continue
        position = position.finished(read_from=read_from, started=started,
                                     began=started.timestamp(), overlap=overlap)
        runs.append(FeedRun(started=started, read_from=read_from,
                            full=position.covered == max(EPOCH, started - overlap),
                            listed_by=crashed_at or started))
        crashed_at = None
        if not (kept or number):
            position = replace(position, covered=None)
    return runs


@given(st.lists(st.floats(min_value=0.5, max_value=120.0), min_size=1, max_size=60),
       st.floats(min_value=0.0, max_value=1.0), st.floats(min_value=0.0, max_value=1.0),
       st.frozensets(st.integers(min_value=1, max_value=60), max_size=5), st.booleans(),
       st.frozensets(st.integers(min_value=1, max_value=60), max_size=4))
def test_every_opt_in_is_read_once_listed_within_about_twice_the_overlap(
        gaps: list[float], place: float, lateness: float, crashes: frozenset[int],
        kept: bool, held: frozenset[int]) -> None:
    runs = feed_runs(gaps, crashes=crashes, kept=kept, held=held)
    last = runs[-1].listed_by
    # stamped after the first read's start, listed within the overlap of its stamp
    stamped = T + timedelta(seconds=(last - T).total_seconds() * place)
    listed = stamped + OVERLAP * lateness
    reading = [run for run in runs[1:] if run.read_from <= stamped and run.listed_by >= listed]
    bound = 3 * OVERLAP + (3 + len(held)) * timedelta(seconds=max(gaps))
    if listed + bound <= last:
        assert reading, (stamped, listed, runs)
        assert reading[0].listed_by - listed <= bound, (stamped, listed, reading[0], runs)


# (runs closer together than the overlap: most reads start where the previous one began)
@given(st.lists(st.floats(min_value=0.5, max_value=10.0), min_size=1, max_size=60),
       st.floats(min_value=0.0, max_value=1.0),
       st.frozensets(st.integers(min_value=1, max_value=60), min_size=1, max_size=5),
       st.frozensets(st.integers(min_value=1, max_value=60), max_size=4))
def test_an_opt_in_listed_at_once_is_read_by_the_first_run_that_finds_it_listed(
        gaps: list[float], place: float, crashes: frozenset[int],
        held: frozenset[int]) -> None:
    """Whatever the crashes: a read resumed after one read the contacts before where it went
    on as the run that began it found them, so the read after it starts there (rule 6 of
    FeedPosition), and an entry stamped (and listed) since is read by it, not by the next read
    of the overlap only."""
    runs = feed_runs(gaps, crashes=crashes, held=held)
    stamped = T + timedelta(seconds=(runs[-1].listed_by - T).total_seconds() * place)
    finding = [run for run in runs[1:] if run.listed_by >= stamped]
    if finding:
        assert finding[0].read_from <= stamped, (stamped, finding[0], runs)


@given(st.lists(st.floats(min_value=30.0, max_value=3600.0), min_size=1, max_size=20))
def test_feed_runs_an_overlap_apart_each_read_the_overlap(gaps: list[float]) -> None:
    runs = feed_runs(gaps)
    for before, run in pairwise(runs[1:]):
        assert run.full and run.read_from <= before.started - OVERLAP


def test_a_feed_synced_every_five_seconds_reads_its_overlap_one_run_in_six() -> None:
    runs = feed_runs([5.0] * 70)
    assert [n for n, run in enumerate(runs) if run.full][1:] == list(range(6, 71, 6))
    for before, run in pairwise(runs):
        if not run.full:
            assert run.read_from == before.started


def test_a_feed_position_kept_before_covered_reads_on_as_if_that_read_was_full() -> None:
    runs = feed_runs([5.0] * 13, kept=False)
    assert [n for n, run in enumerate(runs) if run.full][1:] == [6, 12]
    position = FeedPosition(since=T, previous=T - OVERLAP, began_at=T.timestamp())
    five = (T + timedelta(seconds=5)).timestamp()
    assert position.next_read(overlap=OVERLAP, now=five)[0] == T
    thirty = (T + OVERLAP).timestamp()
    assert position.next_read(overlap=OVERLAP, now=thirty)[0] == T - OVERLAP


def test_a_read_resumed_after_a_crash_starts_where_it_started_and_is_not_full() -> None:
    position = FeedPosition(since=T, covered=T - 2 * OVERLAP, began_at=T.timestamp(),
                            min_contact_id=9, reading_from=T - 2 * OVERLAP)
    later = (T + 3 * OVERLAP).timestamp()
    assert position.next_read(overlap=OVERLAP, now=later)[0] == T - 2 * OVERLAP
    assert position.covered_when_done(T - 2 * OVERLAP, started=T + 3 * OVERLAP,
                                  overlap=OVERLAP) == T - 2 * OVERLAP


def test_a_step_back_of_dotdigitals_clock_beyond_a_seconds_resolution_starts_a_full_read() -> None:
    position = FeedPosition(since=T, covered=T - OVERLAP, began_at=T.timestamp())
    five = T.timestamp() + 5

    def again(behind_s: float) -> datetime | None:
        started = T + timedelta(seconds=5 - behind_s)
        return position.after_step_back(started=started, began=five, overlap=OVERLAP)

    # a watermark from a whole-second Date, less a second, is that early anyway
    assert again(0.0) is None and again(-3.0) is None and again(1.0) is None
    assert again(20.0) == T - OVERLAP - timedelta(seconds=20)
    resumed = replace(position, min_contact_id=4, reading_from=T)
    assert resumed.after_step_back(started=T - timedelta(seconds=15), began=five,
                                   overlap=OVERLAP) is None


def test_feeds_read_their_overlaps_in_different_runs() -> None:
    # five feeds read side by side, a sync every 5 s, as the ec-poller chooses each run
    positions = dict.fromkeys(range(5), FeedPosition(since=EPOCH))
    started = T
    full_runs: dict[int, list[int]] = {feed: [] for feed in positions}
    for number in range(80):
        nexts = {feed: p.next_read(overlap=OVERLAP, now=started.timestamp())
                 for feed, p in positions.items()}
        now_full = overlap_read_now({feed: positions[feed].frontier(OVERLAP)
                                     for feed, (_, due) in nexts.items() if due})
        for feed, position in positions.items():
            start, due = nexts[feed]
            if due and feed != now_full:
                assert position.since is not None
                start = position.since
            covered = position.covered_when_done(start, started=started, overlap=OVERLAP)
            if number and covered != position.frontier(OVERLAP):
                full_runs[feed].append(number)
            positions[feed] = FeedPosition(since=started, covered=covered,
                                           began_at=started.timestamp())
        started += timedelta(seconds=5)
    runs = sorted(n for numbers in full_runs.values() for n in numbers)
    assert len(runs) == len(set(runs))  # one feed's overlap a run at most
    for numbers in full_runs.values():  # and each feed's every six runs, once spread
        assert numbers and all(b - a == 6 for a, b in pairwise(numbers[1:])), full_runs
