"""The write ledger: echo recognition, the flip-flop case, and the writer's go/no-go."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.domain import (
    ContactState,
    KeyState,
    Known,
    Outcome,
    WriteCommand,
    abandon_write,
    begin_write,
    find_echo,
    in_write_window,
    is_superseded,
    reconcile,
    record_write,
    settle,
    start_after_read,
    write_window,
    write_window_end,
    writer_should_apply,
)
from common.domain.sides import Side
from common.domain.writes import IN_FLIGHT_LIMIT, MAX_WRITE_RECORDS
from tests.unit.domain.builders import KEY, at, obs


def _command_to(state: KeyState, side: str) -> WriteCommand:
    (command,) = [c for c in settle(state)[1] if c.side == side]
    return command


def _written(state: KeyState, command: WriteCommand, *, start: float, end: float,
             version: int | None = None) -> KeyState:
    return record_write(state, command, produced_version=version, window_start=at(start),
                        window_end=at(end), written_at=at(end))


def test_echo_recognised_by_dataverse_version() -> None:
    s = reconcile(None, obs("dotdigital", True, 0)).state
    command = _command_to(s, "dynamics")
    s = _written(s, command, start=1, end=1.2, version=41)
    d = reconcile(s, obs("dynamics", True, 1, version=41))
    assert d.outcome is Outcome.ECHO
    assert d.state.register == s.register
    assert d.commands == ()


def test_same_value_with_another_version_is_a_user_change_not_an_echo() -> None:
    s = reconcile(None, obs("dotdigital", True, 0)).state
    s = _written(s, _command_to(s, "dynamics"), start=1, end=1.2, version=41)
    d = reconcile(s, obs("dynamics", True, 3, version=57))
    assert d.outcome is Outcome.APPLIED


def test_echo_recognised_by_vendor_clock_window() -> None:
    s = reconcile(None, obs("dynamics", False, 0, version=1)).state
    s = _written(s, _command_to(s, "dotdigital"), start=2.0004, end=2.3)
    # dotdigital stamps milliseconds: 2.000 is inside once the start is floored to the ms
    assert reconcile(s, obs("dotdigital", False, 2.0)).outcome is Outcome.ECHO
    assert reconcile(s, obs("dotdigital", False, 2.3)).outcome is Outcome.ECHO
    assert reconcile(s, obs("dotdigital", False, 2.301)).outcome is Outcome.APPLIED
    assert reconcile(s, obs("dotdigital", False, 1.999)).outcome is Outcome.APPLIED


def test_echo_of_an_in_flight_write_before_it_is_confirmed() -> None:
    s = reconcile(None, obs("dynamics", True, 0, version=1)).state
    command = _command_to(s, "dotdigital")
    s = begin_write(s, command, window_start=at(1))
    assert reconcile(s, obs("dotdigital", True, 1.5)).outcome is Outcome.ECHO
    late = at(1) + IN_FLIGHT_LIMIT + timedelta(milliseconds=1)
    late_obs = obs("dotdigital", True, (late - at(0)).total_seconds())
    assert reconcile(s, late_obs).outcome is Outcome.APPLIED


def test_abandoned_write_no_longer_swallows_reads() -> None:
    s = reconcile(None, obs("dynamics", True, 0, version=1)).state
    command = _command_to(s, "dotdigital")
    s = abandon_write(begin_write(s, command, window_start=at(1)), command)
    assert find_echo(s, obs("dotdigital", True, 1.5)) is None


def _flip_flop_start() -> tuple[KeyState, WriteCommand]:
    """A Dynamics opt-in at :00 is being written to dotdigital when the person opts out there."""
    s = reconcile(None, obs("dynamics", True, 0, version=1)).state
    command = _command_to(s, "dotdigital")
    s = begin_write(s, command, window_start=at(1))
    # the poller reads the opt-out made at :01.5, before our write lands at :02
    d = reconcile(s, obs("dotdigital", False, 1.5))
    assert d.outcome is Outcome.APPLIED
    assert {(c.side, c.opted_in) for c in d.commands} == {("dynamics", False)}
    return d.state, command


@pytest.mark.parametrize("confirmed_first", [True, False])
def test_flip_flop_newer_opt_out_wins_on_both_sides(confirmed_first: bool) -> None:
    s, command = _flip_flop_start()
    echo = obs("dotdigital", True, 2.0)   # our stale opt-in, landed over the person's opt-out
    if confirmed_first:
        s = _written(s, command, start=1, end=2.1)
        # the opt-out read inside the write's window may be earlier than our write: the side
        # is taken to hold our stale opt-in, and the correction goes out before any echo
        assert s.known.dotdigital is not None and s.known.dotdigital.opted_in is True
        assert ("dotdigital", False) in {(c.side, c.opted_in) for c in settle(s)[1]}
    d = reconcile(s, echo)
    assert d.outcome is Outcome.ECHO
    assert d.state.register is not None
    assert d.state.register.opted_in is False and d.state.register.origin_time == at(1.5)
    assert {(c.side, c.opted_in) for c in d.commands} == {("dynamics", False),
                                                           ("dotdigital", False)}
    assert all(not writer_should_apply(d.state, c) for c in (command,))
    if not confirmed_first:
        s2 = _written(d.state, command, start=1, end=2.1)
        assert s2.register == d.state.register


def test_the_stale_write_is_skipped_when_the_register_moved_before_the_writer_ran() -> None:
    s = reconcile(None, obs("dynamics", True, 0, version=1)).state
    command = _command_to(s, "dotdigital")
    s = reconcile(s, obs("dotdigital", False, 1.5)).state
    assert is_superseded(s, command)
    assert not writer_should_apply(s, command)


def test_writer_skips_when_the_side_already_holds_the_value() -> None:
    s = reconcile(None, obs("dynamics", True, 0, version=1)).state
    command = _command_to(s, "dotdigital")
    assert writer_should_apply(s, command)
    s2 = _written(s, command, start=1, end=1.1)
    assert not writer_should_apply(s2, command)          # a duplicate command after our write
    s3 = reconcile(s, obs("dotdigital", True, 0.5)).state
    assert not writer_should_apply(s3, command)          # the side got there by itself


def test_writer_writes_again_when_the_side_changed_after_our_write_but_lost_a_tie() -> None:
    s = reconcile(None, obs("dynamics", False, 5, version=1)).state
    command = _command_to(s, "dotdigital")
    s = _written(s, command, start=5.1, end=5.2)
    d = reconcile(s, obs("dotdigital", True, 5.6))       # same second: the opt-in loses
    assert d.outcome is Outcome.TIE_OPT_IN_LOST
    assert {(c.side, c.opted_in) for c in d.commands} == {("dotdigital", False)}
    assert writer_should_apply(d.state, d.commands[0])


def test_writer_never_writes_to_a_suppressed_contact() -> None:
    s = reconcile(None, obs("dynamics", True, 0, version=1)).state
    command = _command_to(s, "dotdigital")
    contact = ContactState(account=KEY.account, email=KEY.email, status="HardBounced",
                           since=at(0))
    assert not writer_should_apply(s, command, contact=contact)


def test_record_write_refuses_an_inverted_window() -> None:
    s = reconcile(None, obs("dynamics", True, 0, version=1)).state
    with pytest.raises(ValueError):
        _written(s, _command_to(s, "dotdigital"), start=2, end=1)


def test_retried_write_keeps_the_first_attempts_window_start() -> None:
    s = reconcile(None, obs("dynamics", True, 0, version=1)).state
    command = _command_to(s, "dotdigital")
    s = begin_write(s, command, window_start=at(1))
    s = begin_write(s, command, window_start=at(30))    # redelivered after a crash
    s = _written(s, command, start=30, end=30.2)
    (record,) = s.writes.dotdigital
    assert record.window_start == at(1) and not record.in_flight
    assert reconcile(s, obs("dotdigital", True, 1.2)).outcome is Outcome.ECHO


def test_pruned_records_leave_a_horizon_that_keeps_old_opt_ins_from_winning() -> None:
    s = reconcile(None, obs("dynamics", True, 0, version=1)).state
    t = 1.0
    value = True
    for i in range(MAX_WRITE_RECORDS + 2):
        s = reconcile(s, obs("dynamics", value, t, version=2 + i)).state
        s = _written(s, _command_to(s, "dotdigital"), start=t + 0.1, end=t + 0.2)
        t += 10
        value = not value
    assert len(s.writes.dotdigital) == MAX_WRITE_RECORDS
    assert s.horizon.dotdigital is not None
    # a replayed echo of the very first (pruned) opt-in write is not taken as a user change
    replay = obs("dotdigital", True, 1.15)
    assert find_echo(s, replay) is None
    assert reconcile(s, replay).outcome is Outcome.STALE


def test_a_change_read_inside_the_write_window_keeps_precedence_over_our_write() -> None:
    """Our opt-out landed at :05.2, the person opted in at :05.5, the response came at :05.9:
    the opt-in loses the same-second tie, and dotdigital must be corrected — which only happens
    if the read inside the window is not assumed to predate our write."""
    s = reconcile(None, obs("dynamics", False, 5, version=1)).state
    command = _command_to(s, "dotdigital")
    s = begin_write(s, command, window_start=at(5.1))
    s = _written(s, command, start=5.1, end=5.9)
    d = reconcile(s, obs("dotdigital", True, 5.5))
    assert d.outcome is Outcome.TIE_OPT_IN_LOST
    assert {(c.side, c.opted_in) for c in d.commands} == {("dotdigital", False)}


def test_a_dataverse_write_without_its_version_is_learnt_from_the_echo() -> None:
    s = reconcile(None, obs("dotdigital", True, 0)).state
    command = _command_to(s, "dynamics")
    s = _written(s, command, start=1, end=1.4)
    assert s.known.dynamics is None
    d = reconcile(s, obs("dynamics", True, 1, version=12))
    assert d.outcome is Outcome.ECHO
    assert d.state.known.dynamics is not None and d.state.known.dynamics.version == 12


def test_in_flight_records_are_the_last_to_be_forgotten() -> None:
    s = reconcile(None, obs("dynamics", True, 0, version=1)).state
    first = _command_to(s, "dotdigital")
    s = begin_write(s, first, window_start=at(0.5))       # the writer stops mid-write
    value, t = False, 1.0
    for i in range(MAX_WRITE_RECORDS + 1):
        s = reconcile(s, obs("dynamics", value, t, version=2 + i)).state
        s = _written(s, _command_to(s, "dotdigital"), start=t + 0.1, end=t + 0.2)
        value, t = not value, t + 10
    assert any(r.in_flight for r in s.writes.dotdigital)
    assert len(s.writes.dotdigital) == MAX_WRITE_RECORDS


def test_an_opt_out_read_while_our_opt_out_write_is_unconfirmed_counts_as_a_user_change() -> None:
    """A person's opt-out made while our opt-out write is in flight (say the writer stopped
    mid-write) must not be hidden as our echo: a later, older opt-in from the other side would
    then win over it."""
    s = reconcile(None, obs("dotdigital", False, 0)).state
    command = _command_to(s, "dynamics")
    s = begin_write(s, command, window_start=at(1))
    d = reconcile(s, obs("dynamics", False, 30, version=5))      # the person, 29 s later
    assert d.outcome is Outcome.APPLIED
    late_opt_in = reconcile(d.state, obs("dotdigital", True, 20))
    assert late_opt_in.outcome is Outcome.STALE
    # an opt-in read in the same open window is still taken as our echo (never opts anyone in)
    s_in = reconcile(None, obs("dotdigital", True, 0)).state
    s_in = begin_write(s_in, _command_to(s_in, "dynamics"), window_start=at(1))
    assert reconcile(s_in, obs("dynamics", True, 30, version=5)).outcome is Outcome.ECHO


def test_known_limit_a_same_value_change_inside_a_confirmed_window_is_taken_as_our_echo() -> None:
    """Without a version, a person's change to the value we are writing, stamped inside our
    write's window, cannot be told from our echo. The register keeps the older origin, so an
    opt-in from the other side stamped between the two can still win. Windows should be as
    narrow as the writer can make them; Dataverse writes are matched by version instead."""
    s = reconcile(None, obs("dynamics", False, 0, version=1)).state
    command = _command_to(s, "dotdigital")
    s = _written(s, command, start=10, end=12)
    d = reconcile(s, obs("dotdigital", False, 11))               # a person's opt-out, or ours?
    assert d.outcome is Outcome.ECHO
    later = reconcile(d.state, obs("dynamics", True, 5, version=2))
    assert later.outcome is Outcome.APPLIED


def test_one_write_to_many_rows_keeps_every_rows_record() -> None:
    """A write that reached six Dynamics rows of one email is recognised in all six read-backs."""
    from common.domain import Observation, PreferenceKey, WriteCommand, find_echo, record_write
    from common.domain.state import KeyState

    key = PreferenceKey(account="acme", email="a@example.com", preference_id=1)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    command = WriteCommand(key=key, side="dynamics", opted_in=False, origin_time=t0,
                           origin_side="dotdigital", change_id="c")
    state = KeyState(key=key)
    for version in range(100, 106):
        state = record_write(state, command, produced_version=version, window_start=t0,
                             window_end=t0 + timedelta(seconds=1), written_at=t0)
    for version in range(100, 106):
        echo = Observation(key=key, side="dynamics", opted_in=False,
                           origin_time=t0 + timedelta(seconds=1), version=version)
        assert find_echo(state, echo) is not None, version


def test_a_carried_value_leaves_the_side_known_as_read_so_a_racing_write_is_corrected() -> None:
    # The new email: dotdigital's opt-in, and the record's row (opted out) read for it.
    s = reconcile(None, obs("dotdigital", True, 10)).state
    s = reconcile(s, obs("dynamics", False, 5, version=1)).state
    command = _command_to(s, "dynamics")                  # opt in on the record
    # The old email's opt-out is carried to the new one (the email changed at 12 s) ...
    carried = replace(obs("dynamics", False, 12), carried=True)
    d = reconcile(s, carried)
    assert d.outcome is Outcome.APPLIED and d.state.register is not None
    assert d.state.register.opted_in is False
    assert d.state.known.dynamics == s.known.dynamics     # not a read of the record
    # ... while the writer, which had checked the ledger before, writes the opt-in.
    s = _written(d.state, command, start=12, end=12.2, version=2)
    # The record is now known to hold the opt-in, so the carried opt-out is written again.
    assert _command_to(s, "dynamics").opted_in is False


def test_a_change_read_inside_our_write_window_with_the_other_value_still_gets_a_correction(
        ) -> None:
    # The register says opt-in (a Dynamics change); the writer starts writing it to
    # dotdigital at 10. The person opts out in dotdigital at 10.5, inside the write's window,
    # and the reconciler reads that before the writer confirms. Our write may have landed
    # after the person's change (dotdigital then holds our stale opt-in) or before it: the
    # ledger cannot tell, so a correction must go out, never nothing.
    s = reconcile(None, obs("dynamics", True, 0, version=1)).state
    command = _command_to(s, "dotdigital")
    s = begin_write(s, command, window_start=at(10))
    d = reconcile(s, obs("dotdigital", False, 10.5))
    assert d.outcome is Outcome.APPLIED
    assert d.state.register is not None and not d.state.register.opted_in
    s = _written(d.state, command, start=10, end=11)
    _, commands = settle(s)
    assert ("dotdigital", False) in [(c.side, c.opted_in) for c in commands]


def test_a_change_read_after_our_write_window_is_what_the_side_holds() -> None:
    s = reconcile(None, obs("dynamics", True, 0, version=1)).state
    command = _command_to(s, "dotdigital")
    s = begin_write(s, command, window_start=at(10))
    s = reconcile(s, obs("dotdigital", False, 12)).state
    s = _written(s, command, start=10, end=11)
    known = s.known.get("dotdigital")
    assert known is not None and not known.opted_in   # landed after ours: no doubt
    assert "dotdigital" not in [c.side for c in settle(s)[1]]


@given(start_ms=st.integers(0, 10**7), stamp_ms=st.integers(-10**6, 2 * 10**7),
       length_ms=st.one_of(st.none(), st.integers(0, 10**7)),
       side=st.sampled_from(["dynamics", "dotdigital"]))
def test_a_change_is_in_a_write_window_between_its_floored_start_and_its_end(
        start_ms: int, stamp_ms: int, length_ms: int | None, side: Side) -> None:
    start = at(0) + timedelta(milliseconds=start_ms, microseconds=start_ms % 997)
    end = None if length_ms is None else start + timedelta(milliseconds=length_ms)
    stamp = at(0) + timedelta(milliseconds=stamp_ms)
    resolution = timedelta(seconds=1) if side == "dynamics" else timedelta(milliseconds=1)
    floor = at(0) + (start - at(0)) // resolution * resolution
    last = end if end is not None else start + IN_FLIGHT_LIMIT
    assert in_write_window(stamp, side=side, start=start, end=end) == (floor <= stamp <= last)
    # the bounds a reader of many stamps works out once are the same window
    assert write_window(side=side, start=start, end=end) == (floor, last)
    # the side's own stamp of our write, made at the window's start (at its resolution), is in
    assert in_write_window(floor, side=side, start=start, end=end)


@given(start_ms=st.integers(0, 10**6), read_ms=st.one_of(st.none(), st.integers(0, 2 * 10**6)),
       length_ms=st.integers(0, 10**6))
def test_a_write_after_a_read_starts_just_after_the_change_it_read(
        start_ms: int, read_ms: int | None, length_ms: int) -> None:
    start = at(0) + timedelta(milliseconds=start_ms)
    end = start + timedelta(milliseconds=length_ms)
    read = None if read_ms is None else at(0) + timedelta(milliseconds=read_ms)
    got = start_after_read(start, read=read, window_end=end)
    assert start <= got <= end
    if read is None or read < start:
        assert got == start
    elif read < end:
        assert got > read  # strictly after: known as newer than the change it overwrote
        assert Known(opted_in=False, as_of=got).is_newer_than(Known(opted_in=True, as_of=read))


def test_a_persons_opt_out_read_after_our_answer_is_theirs_not_our_echo() -> None:
    """Our opt-out write lands in dotdigital at 19.3 s; its answer's Date header says 19, so
    the sure window reaches 20. The person opts in in Dynamics at 19, then out in dotdigital at
    19.490. Our time base places the answer's receipt at 19.35: the window ends there, and
    their opt-out is no read back of ours. (Inside the sure window it would be one, taken for
    a person's by rule 2's exception of reconcile: below.)"""
    s = reconcile(None, obs("dynamics", False, 0, version=1)).state
    command = _command_to(s, "dotdigital")
    answered, received = at(20), at(19.35)
    for end, ours in ((answered, True), (write_window_end(
            opted_in=False, start=at(19.1), answered=answered, received=received), False)):
        w = record_write(s, command, produced_version=None, window_start=at(19.1),
                         window_end=end, written_at=end)
        w = reconcile(w, obs("dynamics", True, 19, version=2)).state   # the person opts in
        person = obs("dotdigital", False, 19.49)                       # and out, over there
        assert (find_echo(w, person) is not None) is ours
        d = reconcile(w, person)
        assert d.state.register is not None and not d.state.register.opted_in


def _opt_out_on_its_way(register_at: float = 31) -> tuple[KeyState, WriteCommand]:
    """A Dynamics opt-out (at 31 s) is the register; our write of it to dotdigital ran from
    the read before it (29.254) to its answer (Date header 34, so 35); it is recorded."""
    s = reconcile(None, obs("dynamics", False, register_at, version=283)).state
    command = _command_to(s, "dotdigital")
    return _written(s, command, start=29.254, end=35), command


@pytest.mark.parametrize("read_back_first", [False, True])
def test_an_opt_out_read_back_may_be_a_persons_made_while_our_write_was_on_its_way(
        read_back_first: bool) -> None:
    """Rule 2's exception of reconcile (a chaos run's lost opt-out): the person opts in in
    Dynamics at 34 s, then out in dotdigital at 34.671; our opt-out write lands at 34.950 and
    restamps their opt-out with its own time. The read back at 34.950 is all that is left of
    it: it wins over the opt-in (the same second: a tie, the opt-out wins), in either order."""
    s, _ = _opt_out_on_its_way()
    opt_in, read_back = obs("dynamics", True, 34, version=287), obs("dotdigital", False, 34.95)
    if read_back_first:
        s = reconcile(s, read_back).state
        d = reconcile(s, opt_in)
        assert d.outcome is Outcome.TIE_OPT_IN_LOST
    else:
        s = reconcile(s, opt_in).state
        d = reconcile(s, read_back)
        assert d.outcome is Outcome.TIE_OPT_OUT_WON
    assert d.state.register is not None and not d.state.register.opted_in
    assert {(c.side, c.opted_in) for c in d.commands} == {("dynamics", False)}


@pytest.mark.parametrize("read_back_first", [False, True])
def test_an_opt_in_made_before_our_opt_out_write_began_or_after_its_read_back_wins(
        read_back_first: bool) -> None:
    """The exception's bounds: an opt-in the other side made before our write began (28 s,
    wholly before the window's start; the register's opt-out is of 20 s) is not raced by it,
    and one made after its read back's second (36 s) is newer than any opt-out it could
    hide."""
    for when in (28, 36):
        s, _ = _opt_out_on_its_way(register_at=20)
        opt_in = obs("dynamics", True, when, version=287)
        read_back = obs("dotdigital", False, 34.95)
        if read_back_first:
            s = reconcile(s, read_back).state
            assert reconcile(s, opt_in).outcome is Outcome.APPLIED, when
        else:
            s = reconcile(s, opt_in).state
            assert reconcile(s, read_back).outcome is (
                Outcome.ECHO if when == 28 else Outcome.STALE), when


def test_a_dataverse_read_back_told_by_its_row_version_is_our_echo_whatever_the_register(
        ) -> None:
    """The exception is for writes told by their window only: a row version says which
    write a Dataverse row's opt-out is."""
    s = reconcile(None, obs("dotdigital", False, 31)).state
    command = _command_to(s, "dynamics")
    s = _written(s, command, start=29, end=35, version=300)
    s = reconcile(s, obs("dotdigital", True, 33)).state             # the person opts in there
    assert reconcile(s, obs("dynamics", False, 34, version=300)).outcome is Outcome.ECHO


@given(start_ms=st.integers(0, 10**6), answered_ms=st.integers(0, 2 * 10**6),
       received_ms=st.one_of(st.none(), st.integers(-10**6, 3 * 10**6)), opted_in=st.booleans())
def test_only_an_opt_outs_window_ends_where_our_time_base_places_the_answer(
        start_ms: int, answered_ms: int, received_ms: int | None, opted_in: bool) -> None:
    start = at(0) + timedelta(milliseconds=start_ms)
    answered = start + timedelta(milliseconds=answered_ms)
    received = None if received_ms is None else start + timedelta(milliseconds=received_ms)
    end = write_window_end(opted_in=opted_in, start=start, answered=answered, received=received)
    assert start <= end <= answered                     # never wider than the sure window
    if opted_in or received is None:
        assert end == answered                          # an opt-in's echo is never missed
    else:
        assert end == max(start, min(received, answered))
