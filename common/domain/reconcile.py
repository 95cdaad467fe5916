"""Reconciliation: fold one observation into a key's state and say which writes are needed.

Rules, in order:

1. A suppressed contact's preferences are not read: outcome ``suppressed``, nothing changes.
2. An observation matching a write of ours (see :func:`common.domain.writes.is_echo`) is an
   ``echo``: it moves what the side is known to hold forward, never the register, which keeps
   the original change's time. So if a newer change happened on the other side while our write
   of an older value was in flight, that newer change still wins on both sides (no flip-flop).
3. An observation identical to what is already known for its side is a ``duplicate`` (a stamp
   beyond the future bound read again, at another time, included).
4. A carried value (an email change's, see :class:`Observation`) goes straight to rule 6 and
   leaves what the side is known to hold as it was.
5. Otherwise it is a user change (what the side is known to hold moves forward if it is newer
   for that side) — unless it is an opt-in the write ledger can no longer classify: at or before
   the horizon of pruned write records of its side (e.g. a replayed old message), it might be
   the echo of a forgotten write of ours, so it is ``stale`` and never opts anyone in. An opt-out
   there is still taken as a user change: at worst an old echo of an opt-out wins.
6. Against the register, in our time base, at whole-second precision (see
   :func:`common.domain.clock.span`): each change's second, moved by its side's measured clock
   offset and widened by that offset's uncertainty. A later span wins (``applied``); an earlier
   one is ``stale``; spans that overlap (the same second, or a difference smaller than the
   combined uncertainty) are a tie and the opt-out wins — ``tie_opt_out_won`` when an opt-out
   replaces an opt-in, ``tie_opt_in_lost`` when an opt-in is refused; a tie with the same value
   keeps the first (``tie_same_value``). Two stamps of one side are compared on that side's
   clock, second against second: its offset and uncertainty cancel. A stamp beyond the future
   bound competes as of the time it was read (:func:`common.domain.time_base.in_time_base`),
   never on the stamp.
7. Every decision (duplicates included) ends with :func:`settle`: each side not known to hold the
   register's value gets a write command, and ``pending`` remembers it. Commands are re-emitted
   until the side is known to hold the value, because state is committed before commands are
   published and a crash in between must not lose a write; writers are idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from common.domain.clock import order, span
from common.domain.commands import WriteCommand
from common.domain.observation import Observation
from common.domain.sides import SIDES
from common.domain.state import KeyState, Known, PendingWrite, Register
from common.domain.suppression import ContactState
from common.domain.writes import is_echo, prune_writes


class Outcome(StrEnum):
    APPLIED = "applied"
    STALE = "stale"
    TIE_OPT_OUT_WON = "tie_opt_out_won"
    TIE_OPT_IN_LOST = "tie_opt_in_lost"
    TIE_SAME_VALUE = "tie_same_value"
    ECHO = "echo"
    DUPLICATE = "duplicate"
    SUPPRESSED = "suppressed"


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """The new state (save it when ``changed``), what happened, and the writes to publish."""

    state: KeyState
    outcome: Outcome
    commands: tuple[WriteCommand, ...]
    changed: bool


def outstanding(state: KeyState) -> tuple[WriteCommand, ...]:
    """Write commands for every side not known to hold the register's value."""
    register = state.register
    if register is None:
        return ()
    commands = []
    for side in SIDES:
        known = state.known.get(side)
        if known is None or known.opted_in != register.opted_in:
            commands.append(WriteCommand.for_register(key=state.key, side=side,
                                                      register=register))
    return tuple(commands)


def settle(state: KeyState) -> tuple[KeyState, tuple[WriteCommand, ...]]:
    """The outstanding commands, with ``pending`` updated to match them."""
    commands = outstanding(state)
    for command in commands:
        state = state.with_pending(command.side, PendingWrite(
            opted_in=command.opted_in, origin_time=command.origin_time))
    return state, commands


def _against_register(register: Register | None, observation: Observation) -> Outcome:
    if register is None:
        return Outcome.APPLIED
    if register.origin_side == observation.side:
        # one clock stamped both: its offset and its uncertainty cancel
        later = order(span(vendor_time=observation.vendor_time),
                      span(vendor_time=register.vendor_time))
    else:
        later = order(observation.span, register.span)
    if later > 0:
        return Outcome.APPLIED
    if later < 0:
        return Outcome.STALE
    if observation.opted_in == register.opted_in:
        return Outcome.TIE_SAME_VALUE
    return Outcome.TIE_OPT_OUT_WON if not observation.opted_in else Outcome.TIE_OPT_IN_LOST


def _beyond_ledger(state: KeyState, observation: Observation) -> bool:
    horizon = state.horizon.get(observation.side)
    return horizon is not None and horizon.covers(observation)


def reconcile(state: KeyState | None, observation: Observation, *,
              contact: ContactState | None = None) -> Decision:
    """Fold ``observation`` into ``state`` (``None``: nothing stored yet for the key)."""
    before = state if state is not None else KeyState(key=observation.key)
    if before.key != observation.key:
        raise ValueError("observation is for another key")
    if contact is not None and contact.suppressed:
        return Decision(state=before, outcome=Outcome.SUPPRESSED, commands=(), changed=False)

    side = observation.side
    known = before.known.get(side)
    seen = Known.of(observation)
    after = before
    if observation.carried:
        # Not a read of the side: only the register may move (a write of ours that lands after
        # it is then still known, and corrected, because the side's knowledge stays as read).
        outcome = _against_register(before.register, observation)
        if outcome in (Outcome.APPLIED, Outcome.TIE_OPT_OUT_WON):
            after = replace(after, register=Register.of(observation))
    elif is_echo(before, observation):
        outcome = Outcome.ECHO
        if seen.is_newer_than(known):
            after = prune_writes(after.with_known(side, seen), side)
    elif seen.same_as(known):
        outcome = Outcome.DUPLICATE
    else:
        if seen.is_newer_than(known):
            after = after.with_known(side, seen)
        if observation.opted_in and _beyond_ledger(before, observation):
            outcome = Outcome.STALE
        else:
            outcome = _against_register(before.register, observation)
            if outcome in (Outcome.APPLIED, Outcome.TIE_OPT_OUT_WON):
                after = replace(after, register=Register.of(observation))
        after = prune_writes(after, side)
    after, commands = settle(after)
    return Decision(state=after, outcome=outcome, commands=commands, changed=after != before)
