"""Our time base: the clock estimator (noisy round trips, an outlier, a step), vendor times
moved into our clock, the future bound, and last-writer-wins compared in one time base."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.domain import (
    ClockEstimate,
    ClockState,
    Known,
    Observation,
    OffsetSample,
    Outcome,
    Verdict,
    in_time_base,
    order,
    outstanding,
    reconcile,
    record_write,
    settle,
    span,
    start_after_read,
    whole_second,
)
from common.domain.clock import UNKNOWN_EPOCH
from common.domain.time_base import STALE_AGE, STEP_AGREEMENT
from tests.unit.domain.builders import T0, at, examples, obs

FAST = examples(100)
TOLERANCE = timedelta(minutes=5)


def exchange(rng: random.Random, *, offset_s: float, start_s: float, resolution_s: float,
             max_rtt_s: float = 0.5) -> OffsetSample:
    """One honest round trip: the vendor reads its clock (``offset_s`` ahead of ours) at a
    random moment of a random round trip, and truncates it to its resolution."""
    rtt = rng.uniform(0.001, max_rtt_s)
    sent = at(start_s) + timedelta(microseconds=rng.randrange(1_000_000))
    read = sent + timedelta(seconds=rng.uniform(0, rtt))
    vendor = read + timedelta(seconds=offset_s)
    micros = int(resolution_s * 1_000_000)
    vendor -= timedelta(microseconds=(vendor - T0) // timedelta(microseconds=1) % micros)
    return OffsetSample.of_exchange(vendor_time=vendor, resolution_s=resolution_s, sent=sent,
                                    received=sent + timedelta(seconds=rtt))


def feed(samples: list[OffsetSample], state: ClockState | None = None) -> ClockState:
    state = state or ClockState()
    for sample in samples:
        state, _ = state.add(sample)
    return state


def holds(estimate: ClockEstimate | None, offset_s: float) -> bool:
    assert estimate is not None
    return abs(estimate.offset_s - offset_s) <= estimate.uncertainty_s + 1e-9


# --- one sample ------------------------------------------------------------------------------
def test_a_round_trip_bounds_the_offset_by_half_of_it_around_its_midpoint() -> None:
    sample = OffsetSample.of_exchange(vendor_time=at(30.1), resolution_s=0.001, sent=at(0),
                                      received=at(0.2))
    assert sample.offset_s == pytest.approx(30.0005)       # the midpoint, plus half a ms
    assert sample.uncertainty_s == pytest.approx(0.1005)   # half the round trip
    # A Date header or a modifiedon (whole seconds) leaves half a second more each way.
    coarse = OffsetSample.of_exchange(vendor_time=at(30), resolution_s=1.0, sent=at(0),
                                      received=at(0.2))
    assert (coarse.low_s, coarse.high_s) == pytest.approx((29.8, 31.0))


# --- the estimator ----------------------------------------------------------------------------
@FAST
@given(seed=st.integers(0, 2**32), offset=st.floats(-120, 120), n=st.integers(1, 40),
       resolution=st.sampled_from([0.001, 1.0]))
def test_noisy_round_trips_the_estimate_always_holds_the_true_offset(
        seed: int, offset: float, n: int, resolution: float) -> None:
    rng = random.Random(seed)
    state = ClockState()
    for i in range(n):
        state, verdict = state.add(exchange(rng, offset_s=offset, start_s=i * 30.0,
                                            resolution_s=resolution))
        assert verdict in (Verdict.FIRST, Verdict.AGREED)
        assert holds(state.estimate, offset)


def test_many_round_trips_narrow_the_estimate() -> None:
    rng = random.Random(7)
    server_time = feed([exchange(rng, offset_s=30, start_s=i * 30.0, resolution_s=0.001,
                                 max_rtt_s=0.2) for i in range(20)])
    assert server_time.estimate is not None and holds(server_time.estimate, 30)
    assert server_time.estimate.uncertainty_s < 0.02          # narrower than any round trip
    dates = feed([exchange(rng, offset_s=-30.3, start_s=i * 30.0, resolution_s=1.0,
                           max_rtt_s=0.05) for i in range(20)])
    assert dates.estimate is not None and holds(dates.estimate, -30.3)
    assert dates.estimate.uncertainty_s < 0.1                 # far below a Date's half second


@FAST
@given(seed=st.integers(0, 2**32), offset=st.floats(-60, 60), n=st.integers(1, 12),
       where=st.integers(0, 12), wrong_by=st.floats(1.0, 3600.0), sign=st.sampled_from([-1, 1]))
def test_one_outlier_never_moves_the_estimate(seed: int, offset: float, n: int, where: int,
                                               wrong_by: float, sign: int) -> None:
    rng = random.Random(seed)
    honest = [exchange(rng, offset_s=offset, start_s=i * 30.0, resolution_s=0.001)
              for i in range(n + 2)]
    before = feed(honest[:1 + min(where, n)])
    outlier = exchange(rng, offset_s=offset + sign * wrong_by, start_s=(where + 1) * 30.0 - 15,
                       resolution_s=0.001, max_rtt_s=0.01)
    after, verdict = before.add(outlier)
    assert verdict is Verdict.SUSPECT
    assert after.estimate == before.estimate
    # honest samples after it agree, and the suspect is forgotten
    rest = feed(honest[1 + min(where, n):], after)
    assert holds(rest.estimate, offset) and not rest.suspecting


def test_a_clock_step_is_followed_once_several_samples_agree() -> None:
    rng = random.Random(3)
    state = feed([exchange(rng, offset_s=0.0, start_s=i * 30.0, resolution_s=0.001)
                  for i in range(10)])
    established = state.estimate
    verdicts = []
    for i in range(STEP_AGREEMENT):
        state, verdict = state.add(exchange(rng, offset_s=30.0, start_s=400 + i, resolution_s=0.001))
        verdicts.append(verdict)
        if verdict is Verdict.SUSPECT:
            assert state.estimate == established               # not yet: it may be an outlier
    assert verdicts == [Verdict.SUSPECT] * (STEP_AGREEMENT - 1) + [Verdict.STEP]
    assert holds(state.estimate, 30.0) and not state.suspecting
    assert len(state.window) == STEP_AGREEMENT                 # the old samples are dropped


def test_suspects_that_disagree_with_each_other_are_no_step() -> None:
    rng = random.Random(4)
    state = feed([exchange(rng, offset_s=0.0, start_s=0, resolution_s=0.001)])
    established = state.estimate
    for i, wrong in enumerate((30.0, -30.0, 30.0, -30.0)):
        state, verdict = state.add(exchange(rng, offset_s=wrong, start_s=10 + i,
                                            resolution_s=0.001, max_rtt_s=0.01))
        assert verdict is Verdict.SUSPECT and state.estimate == established


@FAST
@given(seed=st.integers(0, 2**32), offset=st.floats(-60, 60), wrong_by=st.floats(-3600, 3600),
       late_s=st.floats(60.0, 7200.0), late=st.integers(1, 2 * STEP_AGREEMENT))
def test_samples_a_minute_older_than_the_newest_move_nothing(
        seed: int, offset: float, wrong_by: float, late_s: float, late: int) -> None:
    rng = random.Random(seed)
    state = feed([exchange(rng, offset_s=offset, start_s=7200 + i * 30.0, resolution_s=0.001)
                  for i in range(4)])
    newest = max(s.at for s in state.window)
    for _ in range(late):
        # a Date header read long ago, folded in now: even several agreeing make no step back
        # (2 s more: each exchange starts up to 1 s after its start and lasts up to 0.5 s)
        sample = exchange(rng, offset_s=offset + wrong_by, start_s=7200 + 90 - late_s - 2,
                          resolution_s=1.0)
        assert newest - sample.at >= STALE_AGE
        after, verdict = state.add(sample)
        assert verdict is Verdict.STALE and after == state


def test_the_uncertainty_grows_with_the_estimates_age() -> None:
    estimate = ClockEstimate(offset_s=1.0, uncertainty_s=0.01, at=at(0), samples=5)
    assert estimate.uncertainty_at(at(0)) == timedelta(seconds=0.01)
    assert estimate.uncertainty_at(at(3600)) > estimate.uncertainty_at(at(60))


# --- vendor times in our time base -------------------------------------------------------------
def placed(o: Observation, offset_s: float | None, read_s: float,
           uncertainty_s: float = 0.001) -> Observation:
    """``o`` in our time base, read at ``read_s`` with the clock just measured."""
    measured = None if offset_s is None else ClockEstimate(
        offset_s=offset_s, uncertainty_s=uncertainty_s, at=at(read_s), samples=3)
    return in_time_base(o, estimate=measured, read_at=at(read_s), tolerance=TOLERANCE)


def test_a_vendor_time_is_moved_by_the_offset() -> None:
    o = placed(obs("dotdigital", True, 130.5), 30, read_s=101)
    assert o.corrected_time == at(100.5) and o.origin_time == at(130.5)
    assert not o.future_timestamp
    unmeasured = placed(obs("dotdigital", True, 130.5), None, read_s=101)
    assert unmeasured.corrected_time == unmeasured.origin_time and unmeasured.span == span(
        vendor_time=at(130.5))


def test_a_stamp_beyond_the_future_bound_is_taken_as_made_when_read() -> None:
    year = 365 * 86_400
    o = placed(obs("dotdigital", True, year), 30, read_s=100)
    assert o.future_timestamp and o.origin_time == at(year)
    assert o.corrected_time == at(100) and o.bounded_time == at(130)   # read, on their clock
    # within the tolerance a stamp is believed (clocks a little apart, a slow read)
    near = placed(obs("dotdigital", True, 130 + 299), 30, read_s=100)
    assert not near.future_timestamp


# --- last-writer-wins in one time base ------------------------------------------------------------
def test_dotdigital_ahead_an_earlier_opt_in_there_never_beats_a_later_opt_out() -> None:
    opt_in = obs("dotdigital", True, 30.2)       # made at 0.2 by our clock, dotdigital +30 s
    opt_out = obs("dynamics", False, 5, version=1)  # made at 5 by our clock
    on_their_word = reconcile(reconcile(None, opt_in).state, opt_out)
    assert on_their_word.outcome is Outcome.STALE                     # the old defect
    first = reconcile(None, placed(opt_in, 30, read_s=10)).state
    d = reconcile(first, placed(opt_out, 0, read_s=10))
    assert d.outcome is Outcome.APPLIED
    assert d.state.register is not None and d.state.register.opted_in is False


def test_dotdigital_behind_its_later_opt_in_wins() -> None:
    opt_out = obs("dynamics", False, 0, version=1)
    opt_in = obs("dotdigital", True, 5.2 - 30)   # made at 5.2 by our clock, dotdigital -30 s
    first = reconcile(None, placed(opt_out, 0, read_s=10)).state
    d = reconcile(first, placed(opt_in, -30, read_s=10))
    assert d.outcome is Outcome.APPLIED
    assert d.state.register is not None and d.state.register.opted_in is True


@FAST
@given(gap_ms=st.integers(-2500, 2500), u_dyn_ms=st.integers(0, 1500),
       u_dd_ms=st.integers(0, 1500), dyn_in=st.booleans(), dyn_first=st.booleans())
def test_a_difference_within_the_combined_uncertainty_is_a_tie_and_never_opts_anyone_in(
        gap_ms: int, u_dyn_ms: int, u_dd_ms: int, dyn_in: bool, dyn_first: bool) -> None:
    dyn = placed(obs("dynamics", dyn_in, 100, version=1), 0, read_s=200, uncertainty_s=u_dyn_ms / 1000)
    dd = placed(obs("dotdigital", not dyn_in, 100 + gap_ms / 1000), 0, read_s=200,
                uncertainty_s=u_dd_ms / 1000)
    first, second = (dyn, dd) if dyn_first else (dd, dyn)
    d = reconcile(reconcile(None, first).state, second)
    assert d.state.register is not None
    tie = order(dyn.span, dd.span) == 0
    if abs(dyn.corrected_time - dd.corrected_time) < dyn.uncertainty + dd.uncertainty:
        assert tie
    if tie:
        assert d.state.register.opted_in is False
        assert d.outcome in (Outcome.TIE_OPT_OUT_WON, Outcome.TIE_OPT_IN_LOST)
        assert all(c.opted_in is False for c in d.commands)


@FAST
@given(a_ms=st.integers(0, 20_000), b_ms=st.integers(0, 20_000), a_in=st.booleans(),
       b_in=st.booleans())
def test_without_a_skew_the_order_is_the_whole_second_rule(a_ms: int, b_ms: int, a_in: bool,
                                                         b_in: bool) -> None:
    a = placed(obs("dynamics", a_in, a_ms / 1000, version=1), 0, read_s=30, uncertainty_s=0)
    b = placed(obs("dotdigital", b_in, b_ms / 1000), 0, read_s=30, uncertainty_s=0)
    expected = (whole_second(a.origin_time) > whole_second(b.origin_time)) - (
        whole_second(a.origin_time) < whole_second(b.origin_time))
    assert order(a.span, b.span) == expected


@FAST
@given(a_ms=st.integers(0, 20_000), b_ms=st.integers(0, 20_000),
       skew_a=st.integers(-3600, 3600), skew_b=st.integers(-3600, 3600), a_in=st.booleans(),
       b_in=st.booleans())
def test_a_measured_skew_changes_no_outcome(a_ms: int, b_ms: int, skew_a: int, skew_b: int,
                                            a_in: bool, b_in: bool) -> None:
    """Changes made at the same moments give the same outcome whatever whole seconds each
    vendor's clock is off by, once the offsets are measured."""
    def run(sa: int, sb: int) -> tuple[Outcome, bool | None]:
        a = placed(obs("dynamics", a_in, a_ms / 1000 + sa, version=1), sa, read_s=30)
        b = placed(obs("dotdigital", b_in, b_ms / 1000 + sb), sb, read_s=30)
        d = reconcile(reconcile(None, a).state, b)
        return d.outcome, d.state.register.opted_in if d.state.register else None
    assert run(skew_a, skew_b) == run(0, 0)


@FAST
@given(ahead_s=st.integers(301, 10**8), later_s=st.integers(2, 3600), offset=st.integers(-60, 60),
       future_first=st.booleans())
def test_a_future_stamp_never_beats_a_change_made_after_it_was_read(
        ahead_s: int, later_s: int, offset: int, future_first: bool) -> None:
    future = placed(obs("dotdigital", True, 100 + offset + ahead_s), offset, read_s=100)
    real = placed(obs("dynamics", False, 100 + later_s, version=1), 0, read_s=100 + later_s)
    assert future.future_timestamp
    first, second = (future, real) if future_first else (real, future)
    d = reconcile(reconcile(None, first).state, second)
    assert d.state.register is not None and d.state.register.opted_in is False


def test_a_future_stamp_read_again_later_is_the_same_change() -> None:
    year = 365 * 86_400
    first = placed(obs("dotdigital", True, year), 0, read_s=100)
    state = reconcile(None, first).state
    opt_out = placed(obs("dynamics", False, 110, version=1), 0, read_s=111)
    state = reconcile(state, opt_out).state
    assert state.register is not None and state.register.opted_in is False
    # Read again at 200, the same stamp would win as a change made at 200: it is a duplicate.
    again = reconcile(state, placed(obs("dotdigital", True, year), 0, read_s=200))
    assert again.outcome is Outcome.DUPLICATE
    assert again.state.register == state.register
    # What dotdigital holds is known as of the first read, so our write there is newer.
    known = state.known.get("dotdigital")
    assert known == Known(opted_in=True, as_of=at(100), stamp=at(year))


def test_an_echo_is_recognised_on_the_vendors_clock_whatever_its_offset() -> None:
    """Write windows are on the vendor's clock, as the stamps of their read-backs are: the
    offset that moves a change into our time base plays no part in telling our echo."""
    state = reconcile(None, placed(obs("dynamics", False, 10, version=1), 0, read_s=11)).state
    (command,) = settle(state)[1]
    # dotdigital 30 s ahead: our write ran from 20 to 21 by our clock, 50 to 51 by its own
    state = record_write(state, command, produced_version=None, window_start=at(50),
                         window_end=at(51), written_at=at(21))
    echo = placed(obs("dotdigital", False, 50.4), 30, read_s=60)
    assert echo.corrected_time == at(20.4)
    d = reconcile(state, echo)
    assert d.outcome is Outcome.ECHO and d.state.register == state.register


# --- a clock that steps: each stamp placed by the epoch that made it -----------------------------
def _stepped(offset_before: float, offset_after: float, *, step_s: float) -> ClockState:
    """A clock measured every 10 s at ``offset_before``, then at ``offset_after`` from
    ``step_s`` on (samples 1 ms wide), until the step is followed."""
    state = ClockState()
    for tick in range(0, int(step_s), 10):
        state, _ = state.add(OffsetSample(at=at(tick), low_s=offset_before - 0.0005,
                                          high_s=offset_before + 0.0005))
    t = float(step_s)
    while state.estimate is not None and state.estimate.epoch == 0:
        state, _ = state.add(OffsetSample(at=at(t), low_s=offset_after - 0.0005,
                                          high_s=offset_after + 0.0005))
        t += 1
    return state


def test_a_step_starts_a_new_epoch_and_keeps_the_earlier_one() -> None:
    state = _stepped(0.0, -30.0, step_s=60)
    estimate = state.estimate
    assert estimate is not None and estimate.epoch == 1
    assert abs(estimate.offset_s + 30) < 0.01
    (before,) = estimate.earlier
    assert before.number == 0 and abs(before.offset_s) < 0.01
    assert before.until_low == at(50) and before.until_high == at(60)


def test_stamps_are_placed_by_the_epoch_that_made_them_and_doubtful_ones_widened() -> None:
    estimate = _stepped(0.0, -30.0, step_s=60).estimate
    assert estimate is not None
    # long before the step, on the old clock: only epoch 0 can have stamped it
    offset_s, uncertainty_s, epoch = estimate.placement(at(10))
    assert epoch == 0 and abs(offset_s) < 0.01
    # well after the step (stamp 100 on a clock 30 s behind: made at 130)
    offset_s, uncertainty_s, epoch = estimate.placement(at(100))
    assert epoch == 1 and abs(offset_s + 30) < 0.01
    # the clock read 40 twice: at 40 (epoch 0) and at 70 (epoch 1): the hull of both
    offset_s, uncertainty_s, epoch = estimate.placement(at(40))
    assert epoch == UNKNOWN_EPOCH and uncertainty_s >= 15 and abs(offset_s + 15) < 0.01


def test_an_opt_in_stamped_before_a_step_back_never_beats_a_later_opt_out_of_that_side() -> None:
    # Dynamics' clock steps back 30 s at 60. An opt-in made at 45 (stamped 45) and the person's
    # opt-out at 80 (stamped 50): by the stamps the opt-in is later; both stamps are ones the
    # clock made twice, so they tie and the opt-out stands.
    estimate = _stepped(0.0, -30.0, step_s=60).estimate
    opt_in = in_time_base(obs("dynamics", True, 45, version=1), estimate=estimate,
                          read_at=at(90), tolerance=TOLERANCE)
    opt_out = in_time_base(obs("dynamics", False, 50, version=2), estimate=estimate,
                           read_at=at(90), tolerance=TOLERANCE)
    for first, second in ((opt_in, opt_out), (opt_out, opt_in)):
        d = reconcile(reconcile(None, first).state, second)
        assert d.state.register is not None and d.state.register.opted_in is False


def _contact_and_joined_lead(*, contact_opted_in: bool, contact_read_s: float
                             ) -> tuple[ClockEstimate | None, Observation, Observation]:
    """Dataverse's clock, stepped back 30 s at 60; the email's contact's row (stamped 39, row
    version 74, read at ``contact_read_s``), and a lead holding the other value that took the
    email at 51, read at 67 (after the step: a stamp the clock read twice)."""
    estimate = _stepped(0.0, -30.0, step_s=60).estimate
    contact_row = in_time_base(obs("dynamics", contact_opted_in, 39, version=74),
                               estimate=estimate, read_at=at(contact_read_s), tolerance=TOLERANCE)
    lead = in_time_base(replace(obs("dynamics", not contact_opted_in, 51), version=None,
                                joined=True), estimate=estimate, read_at=at(67),
                        tolerance=TOLERANCE)
    return estimate, contact_row, lead


def test_a_record_that_took_the_email_before_a_step_back_is_written_after_it() -> None:
    # Dataverse's clock steps back 30 s at 60. The email's contact opted in at 39 (row version
    # 74); a lead holding an opt-out took the email at 51. Both are read after the step, where
    # the clock read their stamps twice: the lead's row must be written the opt-in, whatever
    # order they are read in. (A full chaos run lost an opt-out when the lead's stamp alone was
    # placed by the clock as it was and the contact's row, read again, was ordered by the middle
    # of its doubtful placement: the contact's value was then taken as what Dynamics holds.)
    estimate, contact_row, lead = _contact_and_joined_lead(contact_opted_in=True,
                                                           contact_read_s=67)
    s = reconcile(None, contact_row).state
    s = reconcile(s, lead).state
    again = reconcile(s, in_time_base(obs("dynamics", True, 39, version=74), estimate=estimate,
                                      read_at=at(68), tolerance=TOLERANCE))
    assert again.state.register is not None and again.state.register.opted_in is True
    assert again.state.known.dynamics is not None
    assert again.state.known.dynamics.opted_in is False
    assert "dynamics" in [c.side for c in again.commands]


def test_our_write_to_a_record_that_took_the_email_before_a_step_back_is_known_to_land() -> None:
    # Dataverse's clock steps back 30 s at 60. The email's contact opted out at 39 (row version
    # 74); a lead holding an opt-in took the email at 51, read after the step (its stamp one the
    # clock read twice: placed as the hull of both epochs, about 66 on our clock). The writer,
    # its clock not yet measured again, writes the lead the opt-out: its window on Dataverse's
    # clock starts at 40 (70 on ours), its new row version 80. The write came after the lead's
    # row was read, and its version says so: Dynamics is known to hold the opt-out, and no
    # write to it is outstanding. (A full chaos run left such a key outstanding, the write sent
    # again by the sweep: ordered by time, the write's 40 was older than the hull's middle.)
    _, contact_row, lead = _contact_and_joined_lead(contact_opted_in=False, contact_read_s=45)
    assert lead.clock_epoch == UNKNOWN_EPOCH
    joined = reconcile(reconcile(None, contact_row).state, lead)
    assert joined.outcome is Outcome.JOINED
    [command] = [c for c in joined.commands if c.side == "dynamics"]
    assert command.opted_in is False
    written = record_write(joined.state, command, produced_version=80, window_start=at(40),
                           window_end=at(41), written_at=at(70))
    assert written.known.dynamics is not None and written.known.dynamics.opted_in is False
    assert "dynamics" not in [c.side for c in outstanding(written)]


@pytest.mark.parametrize("read_before", [True, False])
def test_our_write_after_a_change_read_across_a_step_back_is_known_to_land_after_it(
        read_before: bool) -> None:
    # dotdigital's clock ran 30 s ahead and was put back at 60. A person's opt-in it stamped
    # 88 (made at 58) is read at 61: a stamp both epochs could have made, placed as their hull
    # (73 on our clock). It lost to a Dynamics opt-out; the writer read the opt-in again just
    # before writing the opt-out, in [61, 62] on the clock as it is now. The write came after
    # that read: dotdigital is known to hold our opt-out, and its read back (stamped 61.5,
    # placed as the hull too) changes nothing. Without that, the opt-in (at 73) stays newer than the
    # write and every read back (at 46.5), and the opt-out is written on every batch (a full chaos
    # run wrote one preference 131 times in 15 s).
    estimate = _stepped(30.0, 0.0, step_s=60).estimate
    register = in_time_base(obs("dynamics", False, 58, version=5), estimate=None,
                            read_at=at(59), tolerance=TOLERANCE)
    opt_in = in_time_base(obs("dotdigital", True, 88), estimate=estimate, read_at=at(61),
                          tolerance=TOLERANCE)
    assert opt_in.clock_epoch == UNKNOWN_EPOCH
    s = reconcile(reconcile(None, register).state, opt_in).state
    [command] = [c for c in settle(s)[1] if c.side == "dotdigital"]
    assert command.opted_in is False
    start = start_after_read(at(61), read=at(88), window_end=at(62))
    written = record_write(s, command, produced_version=None, window_start=start,
                           window_end=at(62), written_at=at(62),
                           read_before=at(88) if read_before else None)
    back = in_time_base(obs("dotdigital", False, 61.5), estimate=estimate, read_at=at(63),
                        tolerance=TOLERANCE)
    after = reconcile(written, back)
    writes_to_dotdigital = [c for c in after.commands if c.side == "dotdigital"]
    if read_before:
        assert after.state.known.dotdigital is not None
        assert after.state.known.dotdigital.opted_in is False
        assert writes_to_dotdigital == []
    else:
        assert [c.opted_in for c in writes_to_dotdigital] == [False]  # the opt-out again


def test_a_stamp_before_the_step_keeps_its_epochs_offset_when_read_after_it() -> None:
    # read after the step: a stamp made at 10 on the old clock is not moved 30 s (the new
    # epoch reads 10 only at 40, before the step: it cannot have stamped it)
    estimate = _stepped(0.0, -30.0, step_s=60).estimate
    old = in_time_base(obs("dotdigital", False, 10), estimate=estimate, read_at=at(90),
                       tolerance=TOLERANCE)
    assert abs(old.corrected_time - at(10)) < timedelta(seconds=0.01)
    assert old.clock_epoch == 0


def test_a_same_value_tie_keeps_the_latest_reach_of_that_value() -> None:
    # The register is an opt-out in dotdigital at 25.5. A Dynamics opt-out whose stamp the
    # clock made twice (placed 15 s either way of 21) ties with it; it may have been made as
    # late as 36. A dotdigital opt-in at 36.3 must then tie with it (the opt-out stands), not
    # win against the older 25.5.
    register = placed(obs("dotdigital", False, 25.5), 0, read_s=40)
    doubtful = replace(obs("dynamics", False, 6, version=2), offset=timedelta(seconds=-15),
                       uncertainty=timedelta(seconds=15), clock_epoch=UNKNOWN_EPOCH)
    s = reconcile(None, register).state
    d = reconcile(s, doubtful)
    assert d.outcome is Outcome.TIE_SAME_VALUE
    late_opt_in = placed(obs("dotdigital", True, 36.3), 0, read_s=40)
    after = reconcile(d.state, late_opt_in)
    assert after.state.register is not None and after.state.register.opted_in is False
    assert after.outcome is Outcome.TIE_OPT_IN_LOST


def test_a_stamp_no_epoch_can_have_made_takes_the_hull_of_them_all() -> None:
    # The clock jumps 30 s ahead at 60: it never read 60..80 (as measured); a stamp there was
    # made while it moved in a way no sample saw (it went through +2 s, say)
    estimate = _stepped(0.0, 30.0, step_s=60).estimate
    assert estimate is not None
    offset_s, uncertainty_s, epoch = estimate.placement(at(70))
    assert epoch == UNKNOWN_EPOCH and abs(offset_s - 15) < 0.01 and uncertainty_s >= 15


def test_our_write_after_a_step_back_is_not_older_than_a_stamp_made_before_it() -> None:
    # dotdigital's clock was 30 s ahead when the person opted in (real 2.7, stamped 32.7); it
    # is put back; our write of the winning opt-out lands at real 5 (stamped 5). The side holds
    # our opt-out: no write goes out again (before, one went out every batch until 32.7).
    opt_in = replace(placed(obs("dotdigital", True, 32.7), 30, read_s=3), clock_epoch=1)
    opt_out = placed(obs("dynamics", False, 2, version=7), 0, read_s=3)
    s = reconcile(reconcile(None, opt_in).state, opt_out).state
    assert s.register is not None and s.register.opted_in is False
    (command,) = [c for c in settle(s)[1] if c.side == "dotdigital"]
    s = record_write(s, command, produced_version=None, window_start=at(5), window_end=at(5.2),
                     written_at=at(5.2), offset=timedelta(0))
    assert s.known.dotdigital is not None and s.known.dotdigital.opted_in is False
    assert settle(s)[1] == ()
