"""The chaos checker on hand-made histories: what is expected, and what is counted."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.harness.chaos.checker import ClockStep, Observed, RecordView, check, expected_values
from tests.harness.chaos.history import (
    Baseline,
    Create,
    Edit,
    History,
    Join,
    Move,
    Poison,
    Resubscribe,
    Suppress,
)

pytestmark = pytest.mark.chaos

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
A = "ada@example.com"
B = "ben@example.com"
P = 1001


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def dyn(value: bool, seconds: float, *, email: str = A, record: str = "c-a", version: int = 0,
        offset_s: float = 0.0) -> Edit:
    moment = at(seconds).replace(microsecond=0)  # Dataverse stamps whole seconds
    return Edit(side="dynamics", email=email, preference_id=P, opted_in=value, at=moment,
                record_id=record, version=version or None, offset_s=offset_s)


def dd(value: bool, seconds: float, *, email: str = A, offset_s: float = 0.0) -> Edit:
    return Edit(side="dotdigital", email=email, preference_id=P, opted_in=value, at=at(seconds),
                offset_s=offset_s)


def history(*events: Any, baseline: bool = True) -> History:
    out = History()
    if baseline:
        out.add(Baseline(email=A, preference_id=P, opted_in=True))
    for event in events:
        out.add(event)
    return out


def expect(h: History, key: tuple[str, int] = (A, P)) -> bool:
    return expected_values(h)[key].opted_in


def agreed(value: bool | None, *, email: str = A, records: tuple[str, ...] = ("c-a",)) -> Observed:
    """Both sides (every listed record) show ``value``."""
    values = {} if value is None else {P: value}
    return Observed(dotdigital={email: values},
                    records={r: RecordView(email=email, values=values) for r in records})


# --- what is expected -----------------------------------------------------------------------

def test_the_later_second_wins_whichever_side() -> None:
    assert expect(history(dd(False, 1.2), dyn(True, 3))) is True
    assert expect(history(dyn(True, 1), dd(False, 2.5))) is False
    assert expect(history()) is True  # the baseline stands without edits


def test_in_the_same_second_the_opt_out_wins() -> None:
    # Dataverse's whole second against dotdigital's milliseconds inside it
    assert expect(history(dyn(True, 5), dd(False, 5.9))) is False
    assert expect(history(dyn(False, 5), dd(True, 5.1))) is False
    # the next second is later, however close
    assert expect(history(dyn(False, 5), dd(True, 6.001))) is True


def test_edits_of_records_that_never_joined_take_no_part() -> None:
    h = history(Create(record_id="lead-1", record_type="lead", email=A),
                dyn(False, 10, record="lead-1"))
    assert expect(h) is True
    joined = history(Create(record_id="lead-1", record_type="lead", email=A),
                     dyn(False, 10, record="lead-1"), dd(True, 5),
                     Join(record_id="lead-1", at=at(20)))
    # the row's own time counts once the record joins: 10 s beats dotdigital's 5 s
    assert expect(joined) is False


def test_an_edit_belongs_to_the_email_the_record_had_then() -> None:
    h = history(Baseline(email=B, preference_id=P, opted_in=True),
                dyn(False, 1, email=A), Move(record_id="c-a", old_email=A, new_email=B, at=at(2)),
                dyn(False, 3, email=B))
    assert expected_values(h)[(A, P)].opted_in is False
    assert expected_values(h)[(B, P)].opted_in is False
    only_before = history(Baseline(email=B, preference_id=P, opted_in=True), dyn(False, 1),
                          Move(record_id="c-a", old_email=A, new_email=B, at=at(2)))
    assert expected_values(only_before)[(B, P)].opted_in is True


def test_suppression_does_not_change_what_is_expected() -> None:
    h = history(Suppress(email=A, at=at(1)), dd(False, 2), dyn(True, 3),
                Resubscribe(email=A, at=at(4)))
    assert expect(h) is True


def test_clock_offsets_are_taken_out() -> None:
    # dotdigital's clock 30 s ahead: an opt-in there stamped +31 s was made at 1 s real time,
    # before the Dynamics opt-out at 6 s
    h = history(dd(True, 31, offset_s=30), dyn(False, 6))
    expectation = expected_values(h)[(A, P)]
    assert expectation.opted_in is False
    assert expectation.skew_sensitive  # comparing raw stamps would opt the person in
    mirror = history(dyn(False, 1), dd(True, -24, offset_s=-30))  # made at 6 s real time
    assert expected_values(mirror)[(A, P)].opted_in is True


def test_an_opt_in_winning_inside_the_clocks_uncertainty_lets_the_opt_out_stand() -> None:
    h = history(dyn(False, 10), dd(True, 41.2, offset_s=30))  # real 11.2 s: wins by one second
    expectation = expected_values(h)[(A, P)]
    assert expectation.opted_in is True and expectation.opt_out_acceptable
    assert check(h, agreed(False)).ok
    assert check(h, agreed(True)).ok
    mixed = Observed(dotdigital={A: {P: True}}, records={"c-a": RecordView(email=A, values={P: False})})
    assert check(h, mixed).missing_opt_ins == 1
    # without offsets, and with clocks measured exactly, there is no such band
    plain = history(dyn(False, 10), dd(True, 11.2))
    assert not expected_values(plain)[(A, P)].opt_out_acceptable
    assert check(plain, agreed(False)).missing_opt_ins == 1


def test_an_opt_in_one_second_after_an_opt_out_of_the_other_side_is_a_tie_when_clocks_are_uncertain(
        ) -> None:
    # Dataverse stamps whole seconds and its clock is measured to a fraction of one: the
    # product's spans for second 10 (Dynamics) and second 11 (dotdigital) overlap
    plain = history(dyn(False, 10), dd(True, 11.2))
    expectation = expected_values(plain, uncertainty_s=0.17)[(A, P)]
    assert expectation.opted_in is True and expectation.opt_out_acceptable
    assert check(plain, replace(agreed(False), clock_uncertainty_s=0.17)).ok
    assert check(plain, replace(agreed(True), clock_uncertainty_s=0.17)).ok
    # two seconds apart is no tie; nor is the same side (one clock: its uncertainty cancels)
    apart = history(dyn(False, 10), dd(True, 12.2))
    assert not expected_values(apart, uncertainty_s=0.17)[(A, P)].opt_out_acceptable
    same_side = history(dd(False, 10.9), dd(True, 11.2))
    assert not expected_values(same_side, uncertainty_s=0.17)[(A, P)].opt_out_acceptable


def test_a_later_second_settles_an_earlier_tie() -> None:
    h = history(dyn(True, 1), dd(False, 1.5), dyn(True, 2))
    expectation = expected_values(h)[(A, P)]
    assert expectation.opted_in is True
    assert expectation.edits == 3


# --- what is counted ------------------------------------------------------------------------

def test_a_converged_world_passes() -> None:
    verdict = check(history(dd(False, 1)), agreed(False))
    assert verdict.ok, verdict.problems
    assert (verdict.keys, verdict.changes) == (1, 1)


def test_an_opt_out_that_never_arrived_is_lost() -> None:
    observed = Observed(dotdigital={A: {P: False}},
                        records={"c-a": RecordView(email=A, values={P: True})})
    verdict = check(history(dd(False, 1)), observed)
    assert (verdict.lost_opt_outs, verdict.stale_opt_ins) == (1, 0)
    assert verdict.details["lost_opt_outs"][0]["side"] == "dynamics"
    assert not verdict.ok


def test_an_opt_in_written_over_the_opt_out_by_prefsync_is_stale() -> None:
    observed = Observed(
        dotdigital={A: {P: True}}, records={"c-a": RecordView(email=A, values={P: False})},
        journal=[{"side": "dotdigital", "email": A, "preference_id": P, "opted_in": True,
                  "at": "2025-03-01T12:00:09.000Z", "via": "api"}])
    verdict = check(history(dyn(True, 1), dyn(False, 5)), observed)
    assert (verdict.lost_opt_outs, verdict.stale_opt_ins) == (1, 1)
    assert verdict.lost_causes == {"overwritten by prefsync": 1}


def test_a_lost_opt_out_is_put_down_to_clock_skew_where_the_raw_stamps_disagree() -> None:
    h = history(dd(True, 31, offset_s=30), dyn(False, 6))
    verdict = check(h, agreed(True))
    assert verdict.lost_opt_outs == 1 and verdict.skew_sensitive_keys == 1
    assert verdict.lost_causes == {"clock skew": 1}
    assert check(history(dd(False, 1)), Observed(
        dotdigital={A: {P: False}}, records={"c-a": RecordView(email=A, values={P: True})}
    )).lost_causes == {"never delivered": 1}


def test_an_opt_out_overwritten_by_a_write_already_on_its_way_is_reported_apart() -> None:
    # the person opts out on dotdigital 3 ms before prefsync's write of the older opt-in lands
    h = history(Baseline(email=A, preference_id=P, opted_in=False), dyn(True, 54),
                dd(False, 55.185), baseline=False)
    journal = [{"side": "dotdigital", "email": A, "preference_id": P, "opted_in": False,
                "at": "2025-03-01T12:00:55.185Z", "via": "sim"},
               {"side": "dotdigital", "email": A, "preference_id": P, "opted_in": True,
                "at": "2025-03-01T12:00:55.188Z", "via": "api"}]
    observed = Observed(dotdigital={A: {P: True}},
                        records={"c-a": RecordView(email=A, values={P: True})}, journal=journal)
    verdict = check(h, observed)
    assert (verdict.overwritten_in_flight, verdict.lost_opt_outs, verdict.stale_opt_ins) == (1, 0, 0)
    assert verdict.ok
    assert verdict.details["overwritten_in_flight"][0]["overwrote_in_flight"]
    # landing 3 s later, the write had time to see the change: a stale opt-in ...
    late = [journal[0], {**journal[1], "at": "2025-03-01T12:00:58.185Z"}]
    verdict = check(h, Observed(dotdigital=observed.dotdigital, records=observed.records,
                                journal=late))
    assert (verdict.overwritten_in_flight, verdict.lost_opt_outs, verdict.stale_opt_ins) == (0, 1, 1)
    # ... unless writes were held up that long (a latency fault): then it was on its way
    verdict = check(h, Observed(dotdigital=observed.dotdigital, records=observed.records,
                                journal=late), race_window_s=4.0)
    assert verdict.overwritten_in_flight == 1 and verdict.ok


def test_a_missing_opt_in_and_a_missing_value() -> None:
    verdict = check(history(dd(True, 1)), agreed(False))
    assert verdict.missing_opt_ins == 1 and verdict.lost_opt_outs == 0
    verdict = check(history(dd(False, 1)), agreed(None))
    assert verdict.other_wrong == 1 and verdict.lost_opt_outs == 0


def test_every_record_of_the_email_is_checked_once_per_key() -> None:
    observed = Observed(dotdigital={A: {P: False}},
                        records={"c-a": RecordView(email=A, values={P: False}),
                                 "l-a": RecordView(email=A, values={P: True}),
                                 "l-b": RecordView(email=A, values={P: True})})
    verdict = check(history(dd(False, 1)), observed)
    assert verdict.lost_opt_outs == 1
    assert len(verdict.details["lost_opt_outs"]) == 2


def test_records_that_never_joined_are_not_checked_and_must_not_be_written() -> None:
    h = history(Create(record_id="lead-1", record_type="lead", email=A),
                dyn(True, 2, record="lead-1", version=70), dd(False, 3))
    observed = Observed(
        dotdigital={A: {P: False}},
        records={"c-a": RecordView(email=A, values={P: False}),
                 "lead-1": RecordView(email=A, values={P: True})},
        journal=[
            # the harness's own API edit of the lead (matched by row version): not ours
            {"side": "dynamics", "email": A, "record_id": "lead-1", "preference_id": P,
             "opted_in": True, "at": "2025-03-01T12:00:02Z", "version": 70, "via": "api"},
            {"side": "dynamics", "email": A, "record_id": "c-a", "preference_id": P,
             "opted_in": False, "at": "2025-03-01T12:00:04Z", "version": 71, "via": "api"}])
    verdict = check(h, observed)
    assert verdict.ok, verdict.problems
    assert verdict.prefsync_writes == 1
    observed.journal.append(  # type: ignore[attr-defined]
        {"side": "dynamics", "email": A, "record_id": "lead-1", "preference_id": P,
         "opted_in": False, "at": "2025-03-01T12:00:05Z", "version": 72, "via": "api"})
    assert check(h, observed).ineligible_writes == 1


def test_writes_per_target_are_bounded() -> None:
    entry = {"side": "dotdigital", "email": A, "preference_id": P, "opted_in": False,
             "via": "api"}
    journal = [{**entry, "at": f"2025-03-01T12:00:{i:02d}.000Z"} for i in range(2, 7)]
    observed = Observed(dotdigital={A: {P: False}},
                        records={"c-a": RecordView(email=A, values={P: False})}, journal=journal)
    h = history(dyn(False, 1))
    assert check(h, observed, write_slack=3).excess_writes == 0  # 5 <= 2 * 1 + 3
    verdict = check(h, observed, write_slack=2)
    assert verdict.excess_writes == 1 and verdict.max_writes_per_target == 5
    # user edits through the simulator's own routes are not prefsync's writes
    sim = [{**entry, "via": "sim", "at": "2025-03-01T12:00:01.000Z"}] * 9
    assert check(h, Observed(dotdigital=observed.dotdigital, records=observed.records,
                             journal=sim)).prefsync_writes == 0


def test_dead_letters_other_than_the_poison_count() -> None:
    h = history(Poison(message_id="poison-1", reason="malformed"))
    observed = Observed(dotdigital={A: {P: True}},
                        records={"c-a": RecordView(email=A, values={P: True})},
                        dead_letters=[{"message_id": "poison-1", "reason": "malformed"}])
    assert check(h, observed).ok
    worse = Observed(dotdigital=observed.dotdigital, records=observed.records,
                     dead_letters=[{"message_id": "w-1", "reason": "delivery_limit"}])
    verdict = check(h, worse)
    assert (verdict.unexpected_dead_letters, verdict.poison_not_dead_lettered) == (1, 1)


def test_outstanding_writes_restarts_and_convergence_fail_the_run() -> None:
    observed = Observed(dotdigital={A: {P: True}},
                        records={"c-a": RecordView(email=A, values={P: True})},
                        outstanding=[(A, P)], restarts_by_hand=[{"service": "writer-1"}],
                        converged=False)
    verdict = check(history(), observed)
    assert verdict.problems == ["1 keys with outstanding writes", "1 processes restarted by hand",
                                "did not converge"]


def test_a_history_survives_a_round_trip() -> None:
    h = history(dyn(False, 1, version=9), dd(True, 2.345, offset_s=30),
                Create(record_id="l", record_type="lead", email=A), Join(record_id="l", at=at(3)),
                Move(record_id="c-a", old_email=A, new_email=B, at=at(4)),
                Suppress(email=A, at=at(5)), Resubscribe(email=A, at=at(6)),
                Poison(message_id="x", reason="malformed"))
    again = History.from_list(h.to_list())
    assert again.events == h.events


def test_near_a_step_of_a_vendors_clock_an_opt_in_may_tie_with_an_opt_out() -> None:
    # Dynamics' clock steps back 30 s at 100 s: an opt-out made at 110 s (stamped 80 s) and an
    # opt-in in dotdigital at 125 s. The product cannot tell when the stamp 80 s was made (the
    # clock read it twice): opt-out on every side is accepted, opt-in is still expected.
    h = history(dyn(False, 80, offset_s=-30), dd(True, 125))
    steps = [ClockStep(side="dynamics", at=at(100), seconds=-30)]
    expectation = expected_values(h, clock_steps=steps)[(A, P)]
    assert expectation.opted_in is True and expectation.opt_out_acceptable
    assert check(h, replace(agreed(False), clock_steps=steps)).ok
    # far from any step there is no such band
    far = [ClockStep(side="dynamics", at=at(1000), seconds=-30)]
    assert not expected_values(h, clock_steps=far)[(A, P)].opt_out_acceptable
    # an opt-out never gets one the other way round
    mirror = history(dyn(True, 80, offset_s=-30), dd(False, 125))
    assert expected_values(mirror, clock_steps=steps)[(A, P)].opted_in is False


def test_an_edit_stamped_by_a_clock_nobody_could_measure_is_reported_apart() -> None:
    # dotdigital's clock was 30 s behind from 100 s to 160 s and the product took no sample of
    # it meanwhile (its ledger was locked the whole time): the opt-out made at 131 s, stamped
    # 101 s, looks older than the Dynamics opt-in at 120 s. Nothing could tell; it is counted
    # apart, never as a lost opt-out. Measured, it is a lost opt-out as ever.
    h = history(dd(False, 101, offset_s=-30), dyn(True, 120))
    unmeasured = [ClockStep(side="dotdigital", at=at(100), seconds=-30, measured=False,
                            back_at=at(160))]
    verdict = check(h, replace(agreed(True), clock_steps=unmeasured))
    assert verdict.lost_opt_outs == 0 and verdict.unmeasured_skew == 1 and verdict.ok
    measured = [replace(unmeasured[0], measured=True)]
    assert check(h, replace(agreed(True), clock_steps=measured)).lost_opt_outs == 1


def _our_opt_out_to_dotdigital(seconds: float) -> dict[str, Any]:
    stamp = at(seconds).isoformat().replace("+00:00", "Z")
    return {"side": "dotdigital", "email": A, "preference_id": P, "opted_in": False,
            "at": stamp, "via": "api"}


def test_an_opt_in_made_while_our_opt_out_write_was_on_its_way_may_lose_to_it() -> None:
    """Rule 2's exception of common.domain.reconcile: a Dynamics opt-in at 34 s while our
    write of an opt-out to dotdigital was on its way (it landed at 34.950): opt-out on every
    side is accepted, counted apart; opt-in still passes. So for one that landed just before the
    opt-in, within the clocks' uncertainty. Not so for a write that landed long after the
    opt-in, or before it by more, nor where a vendor's clock stepped."""
    h = history(dyn(False, 31), dyn(True, 34))
    on_its_way = replace(agreed(False), journal=[_our_opt_out_to_dotdigital(34.95)])
    verdict = check(h, on_its_way)
    assert verdict.ok, verdict.problems
    assert (verdict.opt_ins_lost_to_a_write_on_its_way, verdict.missing_opt_ins) == (1, 0)
    assert check(h, replace(agreed(True), journal=[_our_opt_out_to_dotdigital(34.95)])).ok
    later = replace(agreed(False), journal=[_our_opt_out_to_dotdigital(60)])
    assert check(h, later).missing_opt_ins == 1
    before = replace(agreed(False), journal=[_our_opt_out_to_dotdigital(33.5)])
    assert check(h, before).missing_opt_ins == 1
    # landed before the opt-in's second, but within the clocks' measured uncertainty of it
    close = check(h, replace(before, clock_uncertainty_s=0.8))
    assert close.opt_ins_lost_to_a_write_on_its_way == 1
    assert check(h, replace(before, clock_uncertainty_s=0.4)).missing_opt_ins == 1
    # dotdigital's clock 30 s ahead: the write's stamp is on it, its real time is not
    shifted = _our_opt_out_to_dotdigital(64.95)
    shifted["real_at"] = _our_opt_out_to_dotdigital(34.95)["at"]
    assert check(h, replace(agreed(False), journal=[shifted])).ok
    stepped = replace(on_its_way, clock_steps=[ClockStep(side="dotdigital", at=at(1000),
                                                         seconds=-30)])
    assert check(h, stepped).missing_opt_ins == 1


def _our_opt_in_to_dotdigital(seconds: float, *, answered: bool) -> dict[str, Any]:
    stamp = at(seconds).isoformat().replace("+00:00", "Z")
    return {"side": "dotdigital", "email": A, "preference_id": P, "opted_in": True,
            "at": stamp, "via": "api", "answered": answered}


def test_an_opt_in_made_while_our_opt_in_write_there_was_unanswered_may_be_taken_for_it() -> None:
    """An opt-in write of ours to dotdigital timed out (journaled unanswered; it landed at
    20 s); the person opted out at 25 s and in again at 40 s, in dotdigital. The product cannot
    tell that opt-in from our write landing late (which would opt them back in with a stale
    value): opt-out on every side is accepted, counted apart; opt-in still passes. Not so when
    a write of ours there was answered between, nor for a write answered, nor past the
    in-flight limit."""
    h = history(dyn(True, 15), dd(False, 25), dd(True, 40))
    unanswered = replace(agreed(False), journal=[_our_opt_in_to_dotdigital(20, answered=False)])
    verdict = check(h, unanswered)
    assert verdict.ok, verdict.problems
    assert (verdict.opt_ins_taken_for_an_unanswered_write, verdict.missing_opt_ins) == (1, 0)
    assert check(h, replace(agreed(True), journal=unanswered.journal)).ok
    answered = replace(agreed(False), journal=[_our_opt_in_to_dotdigital(20, answered=True)])
    assert check(h, answered).missing_opt_ins == 1
    closed = replace(unanswered, journal=[*unanswered.journal,
                                          _our_opt_in_to_dotdigital(22, answered=True)])
    assert check(h, closed).missing_opt_ins == 1
    long_after = history(dyn(True, 15), dd(False, 25), dd(True, 20 + 601))
    assert check(long_after, unanswered).missing_opt_ins == 1
    # an opt-in made in Dynamics is never taken for the echo of a write to dotdigital
    other_side = history(dyn(True, 15), dd(False, 25), dyn(True, 40, version=2))
    assert check(other_side, unanswered).missing_opt_ins == 1
