"""Rule 8 of reconcile: an opt-in taken for the echo of a write of ours while it was in flight
is decided again once that write is closed (:func:`common.domain.reopen`).

The case (a chaos run's missing opt-in): the register is a Dynamics opt-out of 32 s; our write
of an older opt-in to dotdigital was begun at 20 s and stayed in flight through a long read;
the person opted in in dotdigital at 43.876, read meanwhile and taken for our echo. The round
then never sent the write.
"""

from __future__ import annotations

from datetime import timedelta

from common.domain import (
    KeyState,
    Outcome,
    WriteCommand,
    WriteRecord,
    abandon_write,
    begin_write,
    reconcile,
    record_write,
    reopen,
)
from common.domain.clock import ZERO
from tests.unit.domain.builders import at, obs

PERSON = 43.876


def _opt_in_in_flight(opt_out_at: float = 32) -> tuple[KeyState, WriteCommand, WriteRecord]:
    """The state after the person's opt-in was taken for our echo, our command and the write's
    record in flight (the Dynamics opt-out at ``opt_out_at``)."""
    first = reconcile(None, obs("dynamics", True, 0, version=100))
    (command,) = [c for c in first.commands if c.side == "dotdigital"]
    s = begin_write(first.state, command, window_start=at(20))
    (record,) = s.writes.get("dotdigital")
    s = reconcile(s, obs("dynamics", False, opt_out_at, version=101)).state
    d = reconcile(s, obs("dotdigital", True, PERSON))
    assert d.outcome is Outcome.ECHO  # in flight: a same-value opt-in is taken for our echo
    return d.state, command, record


def test_an_opt_in_taken_for_the_echo_of_a_write_never_sent_is_a_persons() -> None:
    s, command, record = _opt_in_in_flight()
    d = reopen(abandon_write(s, command), side="dotdigital", closed=record, uncertainty=ZERO)
    assert d is not None and d.outcome is Outcome.APPLIED
    assert d.state.register is not None and d.state.register.opted_in
    assert d.state.register.origin_time == at(PERSON)
    assert {(c.side, c.opted_in) for c in d.commands} == {("dynamics", True)}
    assert d.state.known.get("dotdigital") == s.known.get("dotdigital")


def test_one_stamped_past_the_window_of_the_write_confirmed_is_a_persons_too() -> None:
    s, command, _ = _opt_in_in_flight()
    s = record_write(s, command, produced_version=None, window_start=at(38), window_end=at(41),
                     written_at=at(42))
    (closed,) = s.writes.get("dotdigital")
    d = reopen(s, side="dotdigital", closed=closed, uncertainty=ZERO)
    assert d is not None and d.state.register is not None and d.state.register.opted_in


def test_one_inside_the_window_of_the_write_confirmed_stays_our_echo() -> None:
    """Our write may have made it: an echo of ours never opts anyone in."""
    s, command, _ = _opt_in_in_flight()
    s = record_write(s, command, produced_version=None, window_start=at(38), window_end=at(45),
                     written_at=at(46))
    (closed,) = s.writes.get("dotdigital")
    assert reopen(s, side="dotdigital", closed=closed, uncertainty=ZERO) is None


def test_one_another_write_of_ours_explains_stays_its_echo() -> None:
    s, command, record = _opt_in_in_flight()
    other = WriteCommand(key=command.key, side="dotdigital", opted_in=True,
                         origin_time=at(1), origin_side="dynamics", change_id="dynamics:other")
    s = begin_write(s, other, window_start=at(30))
    assert reopen(abandon_write(s, command), side="dotdigital", closed=record,
                  uncertainty=ZERO) is None


def test_nothing_is_decided_again_for_an_opt_out_a_register_opted_in_or_a_stamp_before_the_write(
        ) -> None:
    s, command, record = _opt_in_in_flight()
    abandoned = abandon_write(s, command)
    opt_out = WriteRecord(side="dotdigital", opted_in=False, register_origin_time=at(0),
                          window_start=at(20))
    assert reopen(abandoned, side="dotdigital", closed=opt_out, uncertainty=ZERO) is None
    later = WriteRecord(side="dotdigital", opted_in=True, register_origin_time=at(0),
                        window_start=at(PERSON + 1))
    assert reopen(abandoned, side="dotdigital", closed=later, uncertainty=ZERO) is None
    opted_in = reconcile(abandoned, obs("dynamics", True, 50, version=102)).state
    assert reopen(opted_in, side="dotdigital", closed=record, uncertainty=ZERO) is None


def test_decided_again_it_must_beat_the_register_by_a_second_more_than_its_uncertainty() -> None:
    """How the opt-in was placed when read is not kept: a tie it could have lost then is never
    won now. 43.876 against a Dynamics opt-out of 43 s (its whole second reaching 44 s) widened
    by a second more: a tie, the opt-out wins."""
    s, command, record = _opt_in_in_flight(opt_out_at=43)
    assert reopen(abandon_write(s, command), side="dotdigital", closed=record,
                  uncertainty=ZERO) is None
    s, command, record = _opt_in_in_flight(opt_out_at=41)
    assert reopen(abandon_write(s, command), side="dotdigital", closed=record,
                  uncertainty=ZERO) is not None
    assert reopen(abandon_write(s, command), side="dotdigital", closed=record,
                  uncertainty=timedelta(seconds=1)) is None
