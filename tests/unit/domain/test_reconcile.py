"""Example-based tests of the reconcile rules (LWW, ties, duplicates, corrections)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from common.domain import KeyState, Outcome, PreferenceKey, WriteCommand, reconcile
from tests.unit.domain.builders import KEY, at, obs


def _targets(commands: tuple[WriteCommand, ...]) -> set[tuple[str, bool]]:
    return {(c.side, c.opted_in) for c in commands}


def test_first_observation_is_applied_and_written_to_the_other_side() -> None:
    d = reconcile(None, obs("dynamics", True, 0, version=1))
    assert d.outcome is Outcome.APPLIED
    assert d.state.register is not None and d.state.register.opted_in is True
    assert _targets(d.commands) == {("dotdigital", True)}
    (command,) = d.commands
    assert command.origin_side == "dynamics" and command.origin_time == at(0)
    assert d.state.pending.dotdigital is not None
    assert d.state.pending.dotdigital.origin_time == at(0)


def test_newer_change_wins_and_writes_only_where_the_value_differs() -> None:
    s = reconcile(None, obs("dynamics", True, 0, version=1)).state
    s = reconcile(s, obs("dotdigital", True, 1)).state          # both hold opt-in now
    d = reconcile(s, obs("dotdigital", False, 5))
    assert d.outcome is Outcome.APPLIED
    assert _targets(d.commands) == {("dynamics", False)}


def test_a_winning_change_whose_other_side_already_agrees_writes_nothing() -> None:
    s = reconcile(None, obs("dynamics", False, 0, version=1)).state
    d = reconcile(s, obs("dotdigital", False, 3))
    assert d.outcome is Outcome.APPLIED
    assert d.commands == ()


def test_stale_change_never_changes_the_register() -> None:
    s = reconcile(None, obs("dynamics", False, 10, version=2)).state
    d = reconcile(s, obs("dotdigital", True, 4))
    assert d.outcome is Outcome.STALE
    assert d.state.register == s.register


def test_stale_observation_showing_a_different_value_yields_a_corrective_write() -> None:
    s = reconcile(None, obs("dynamics", True, 10, version=2)).state
    s = reconcile(s, obs("dotdigital", True, 11)).state           # in step: both opted in
    # a Dynamics change older than the register, seen late: Dynamics now holds opt-out
    d = reconcile(s, obs("dynamics", False, 9, version=3))
    assert d.outcome is Outcome.STALE
    assert d.state.register == s.register
    assert _targets(d.commands) == {("dynamics", True)}


def test_tie_goes_to_opt_out_in_either_order() -> None:
    opt_in = obs("dynamics", True, 7, version=1)                   # 09:00:07 (whole second)
    opt_out = obs("dotdigital", False, 7.4)                         # 09:00:07.400
    d1 = reconcile(reconcile(None, opt_in).state, opt_out)
    assert d1.outcome is Outcome.TIE_OPT_OUT_WON
    assert d1.state.register is not None and d1.state.register.opted_in is False
    d2 = reconcile(reconcile(None, opt_out).state, opt_in)
    assert d2.outcome is Outcome.TIE_OPT_IN_LOST
    assert d2.state.register is not None and d2.state.register.opted_in is False
    assert _targets(d2.commands) == {("dynamics", False)}


def test_a_later_millisecond_in_the_same_second_does_not_beat_an_opt_out() -> None:
    s = reconcile(None, obs("dotdigital", False, 7.001)).state
    d = reconcile(s, obs("dotdigital", True, 7.999))
    assert d.outcome is Outcome.TIE_OPT_IN_LOST
    assert d.state.register is not None and d.state.register.opted_in is False
    # the side is known to hold the opt-in now, so it is corrected
    assert _targets(d.commands) == {("dynamics", False), ("dotdigital", False)}


def test_same_second_same_value_keeps_the_first() -> None:
    first = obs("dynamics", False, 3, version=1)
    s = reconcile(None, first).state
    d = reconcile(s, obs("dotdigital", False, 3.5))
    assert d.outcome is Outcome.TIE_SAME_VALUE
    assert d.state.register == s.register


def test_duplicate_re_emits_outstanding_writes() -> None:
    o = obs("dynamics", True, 0, version=1)
    first = reconcile(None, o)
    again = reconcile(first.state, o)
    assert again.outcome is Outcome.DUPLICATE
    assert again.commands == first.commands
    assert not again.changed


def test_known_never_rolls_back_on_a_redelivered_old_message() -> None:
    s = reconcile(None, obs("dynamics", True, 0, version=1)).state
    s = reconcile(s, obs("dynamics", False, 5, version=2)).state
    d = reconcile(s, obs("dynamics", True, 0, version=1))
    assert d.state.known.dynamics is not None
    assert d.state.known.dynamics.version == 2 and d.state.known.dynamics.opted_in is False
    assert d.outcome is Outcome.STALE


def test_key_mismatch_is_refused() -> None:
    other_key = PreferenceKey(account="other", email=KEY.email, preference_id=KEY.preference_id)
    with pytest.raises(ValueError):
        reconcile(KeyState(key=other_key), obs("dynamics", True, 0, version=1))


def test_two_changes_on_one_side_are_ordered_by_that_sides_clock_whatever_its_uncertainty(
        ) -> None:
    # The same clock stamped both: its offset and its uncertainty cancel. An opt-out at
    # second 21 and an opt-in at second 22 on dotdigital: the later one wins, as it would with
    # a perfectly measured clock (only the same second is a tie).
    widened = timedelta(milliseconds=400)
    out = replace(obs("dotdigital", False, 21.9), uncertainty=widened)
    later = replace(obs("dotdigital", True, 22.1), uncertainty=widened)
    d = reconcile(reconcile(None, out).state, later)
    assert d.outcome is Outcome.APPLIED
    assert d.state.register is not None and d.state.register.opted_in
    same_second = replace(obs("dotdigital", False, 22.6), uncertainty=widened)
    assert reconcile(d.state, same_second).outcome is Outcome.TIE_OPT_OUT_WON
