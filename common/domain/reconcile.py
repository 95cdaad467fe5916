"""Reconciliation: fold one observation into a key's state and say which writes are needed.

Rules, in order:

1. A suppressed contact's preferences are not read: outcome ``suppressed``, nothing changes.
2. An observation matching a write of ours (see :func:`common.domain.writes.is_echo`) is an
   ``echo``: it moves what the side is known to hold forward, never the register, which keeps
   the original change's time. So if a newer change happened on the other side while our write
   of an older value was in flight, that newer change still wins on both sides (no flip-flop).
   (An opt-out's window is the narrower: :func:`common.domain.writes.write_window_end`.)
   Except an opt-out read back from a confirmed opt-out write of ours matched by its window
   (no row version), while the register holds an opt-in the other side made after that write
   began (not wholly before its window's start, at whole seconds): it is then taken as a user
   change. Our write of a value restamps a person's change of that value made while it was on
   its way (dotdigital stamps a write, not a change), so the read back may be a person's
   opt-out made after that opt-in: opt-out wins what cannot be told apart. The price: an
   opt-in made on the other side while our opt-out write was on its way (from its read to
   its landing) loses to it, unless later than its read back.
3. An observation identical to what is already known for its side is a ``duplicate`` (a stamp
   beyond the future bound read again, at another time, included). So is an opt-in a fold has
   already decided (``decided``: the key's history holds its change, of its side, with its
   value, under a decision in :data:`FOLDED`), read again where its side's clock stepped: its
   stamp, which more than one epoch of the clock could have made, is then placed as the hull
   of their offsets (:data:`~common.domain.clock.UNKNOWN_EPOCH`) and may order after what has
   overwritten it since (our write of the register's value among them). Taken for what the
   side holds again, it would send that write once more on every read of the feed's overlap,
   and could take the register: a stale opt-in. An opt-out read again is decided again: one
   placed wrongly the first time (before the step was measured) must still win.
   :func:`ask_if_decided` says which observations the ledger is asked about.
4. A carried value (an email change's, see :class:`Observation`) goes straight to rule 6 and
   leaves what the side is known to hold as it was. A joined record's value (a record took the
   email) never moves the register: when it differs from the register, the side is known to
   hold it (as of the email change, and of the row version known before it: our write to the
   record, whose row version comes later, is then known to land after it, however the clock
   that stamped the email change is placed), so the register's value is written to that
   record (``joined``); otherwise nothing changes.
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
   replaces an opt-in, ``tie_opt_in_lost`` when an opt-in is refused (rule 2's exception the
   other way round: an opt-in that would replace an opt-out register while the other side is
   known to hold the read back of such an opt-out write of ours, made after that write
   began, must beat that read back too); a tie with the same value
   keeps the one that may have happened later (``tie_same_value``): the value reaches that far,
   so the other value must beat it. Two stamps of one side and one epoch of its clock are
   compared on that clock, second against second: its offset and uncertainty cancel. A stamp
   beyond the future bound competes as of the time it was read
   (:func:`common.domain.time_base.in_time_base`), never on the stamp.
7. Every decision (duplicates included) ends with :func:`settle`: each side not known to hold the
   register's value gets a write command, and ``pending`` remembers it. Commands are re-emitted
   until the side is known to hold the value, because state is committed before commands are
   published and a crash in between must not lose a write; writers are idempotent.
8. A write of ours is closed when its record is confirmed with its window, or forgotten as
   surely never sent (:func:`reopen`). While it was in flight, a same-value opt-in read on its
   side was taken for its echo (rule 2); if what the side is known to hold is such an opt-in
   (told by its time, no row version), stamped at or after the write's start, and the closed
   write cannot have made it (never sent, or the stamp is past its window) and no other write
   of ours explains it, it was a person's: it is decided again as a user change (rules 5-7),
   its span widened by a second more than its clock's uncertainty as measured now (how it
   was placed when read is not kept: a tie it could have lost then is never won now). Else a
   person's opt-in made while we wrote it and never sent it (in a 429 storm, or a round that
   decided not to) was lost to an older opt-out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TypeVar

from common.domain.clock import SECOND, UNKNOWN_EPOCH, ZERO, order, span
from common.domain.commands import WriteCommand
from common.domain.identity import PreferenceKey
from common.domain.observation import Observation
from common.domain.sides import SIDES, PerSide, Side, other
from common.domain.state import KeyState, Known, PendingWrite, Register, WriteRecord
from common.domain.suppression import ContactState
from common.domain.writes import find_echo, in_write_window, is_echo, pruned_writes

T = TypeVar("T")


class Outcome(StrEnum):
    APPLIED = "applied"
    STALE = "stale"
    TIE_OPT_OUT_WON = "tie_opt_out_won"
    TIE_OPT_IN_LOST = "tie_opt_in_lost"
    TIE_SAME_VALUE = "tie_same_value"
    ECHO = "echo"
    JOINED = "joined"
    DUPLICATE = "duplicate"
    SUPPRESSED = "suppressed"


# The decisions that folded an observation into its key's state (rule 3): one parked
# (suppressed), refused (ineligible) or written was not folded, and is folded when read again.
FOLDED = frozenset({Outcome.APPLIED, Outcome.STALE, Outcome.TIE_OPT_OUT_WON,
                    Outcome.TIE_OPT_IN_LOST, Outcome.TIE_SAME_VALUE, Outcome.ECHO,
                    Outcome.JOINED})


def ask_if_decided(*, opted_in: bool, clock_epoch: int) -> bool:
    """Whether to ask the ledger if a fold already decided this observation (rule 3): an
    opt-in placed across epochs of its side's clock. One placed in one epoch orders as it did
    when first read, so it is decided again as it was."""
    return opted_in and clock_epoch == UNKNOWN_EPOCH


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """The new state (save it when ``changed``), what happened, and the writes to publish."""

    state: KeyState
    outcome: Outcome
    commands: tuple[WriteCommand, ...]
    changed: bool


def outstanding(state: KeyState) -> tuple[WriteCommand, ...]:
    """Write commands for every side not known to hold the register's value."""
    return _outstanding(state.key, state.register, state.known)


def _outstanding(key: PreferenceKey, register: Register | None,
                 known: PerSide[Known | None]) -> tuple[WriteCommand, ...]:
    if register is None:
        return ()
    commands = []
    for side in SIDES:
        held = known.get(side)
        if held is None or held.opted_in != register.opted_in:
            commands.append(WriteCommand.for_register(key=key, side=side, register=register))
    return tuple(commands)


def settle(state: KeyState) -> tuple[KeyState, tuple[WriteCommand, ...]]:
    """The outstanding commands, with ``pending`` updated to match them."""
    commands = _outstanding(state.key, state.register, state.known)
    pending = _pending(state.pending, commands)
    return (state if pending is state.pending else state.with_parts(pending=pending)), commands


def _pending(pending: PerSide[PendingWrite | None], commands: tuple[WriteCommand, ...]
             ) -> PerSide[PendingWrite | None]:
    """``pending`` remembering ``commands``: the same object when it already did (so that an
    unchanged state is told by identity, without comparing it whole)."""
    for command in commands:
        write = PendingWrite(opted_in=command.opted_in, origin_time=command.origin_time)
        if pending.get(command.side) != write:
            pending = pending.with_(command.side, write)
    return pending


def _moved(new: T, old: T) -> bool:
    """A part of the state changed: replaced (identity) by a value that differs."""
    return new is not old and new != old


def _against_register(register: Register | None, observation: Observation) -> Outcome:
    if register is None:
        return Outcome.APPLIED
    if _same_clock(register, observation):
        # one clock (one epoch of it) stamped both: its offset and uncertainty cancel
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


def _reaches_later(observation: Observation, register: Register | None) -> bool:
    """A same-value tie whose change may have happened later than the register's: the value
    then reaches that far (rule 6), so a later change of the other value must beat that."""
    if register is None or _same_clock(register, observation):
        return False  # one clock: a tie is the same second
    return observation.span[1] > register.span[1]


def _same_clock(register: Register, observation: Observation) -> bool:
    return (register.origin_side == observation.side
            and register.clock_epoch == observation.clock_epoch != UNKNOWN_EPOCH)


def _unversioned_opt_out(record: WriteRecord) -> bool:
    """A confirmed write of an opt-out of ours, told by its window (no row version)."""
    return not record.opted_in and not record.in_flight and record.produced_version is None


def _began_after(change: tuple[datetime, datetime], record: WriteRecord, *,
                 offset: timedelta, uncertainty: timedelta = ZERO) -> bool:
    """A change (its span in our time base) not wholly before our write began (its window's
    start, on its side's clock ``offset`` ahead of ours)."""
    return order(change, span(vendor_time=record.window_start, offset=offset,
                              uncertainty=uncertainty)) >= 0


def _echo(state: KeyState, observation: Observation) -> bool:
    """Rule 2: :func:`common.domain.writes.is_echo`, but for its exception (an opt-out read
    back from a confirmed opt-out write of ours, told by its window, while the register holds
    an opt-in the other side made after that write began)."""
    if not is_echo(state, observation):
        return False
    record = find_echo(state, observation)
    register = state.register
    return not (record is not None and _unversioned_opt_out(record)
                and register is not None and register.opted_in
                and register.origin_side != observation.side
                and _began_after(register.span, record, offset=observation.offset,
                                 uncertainty=observation.uncertainty))


def _against_opt_out_read_back(state: KeyState, observation: Observation,
                               outcome: Outcome) -> Outcome:
    """Rule 6 for an opt-in that would replace an opt-out register: it must also beat the
    other side's read back of a confirmed opt-out write of ours (rule 2's exception), when
    it was made after that write began."""
    register = state.register
    if (outcome is not Outcome.APPLIED or not observation.opted_in or register is None
            or register.opted_in):
        return outcome
    side = other(observation.side)
    held = state.known.get(side)
    if held is None or held.opted_in or held.version is not None or held.stamp is not None:
        return outcome
    for record in state.writes.get(side):
        if _unversioned_opt_out(record) and in_write_window(
                held.as_of, side=side, start=record.window_start, end=record.window_end):
            if not _began_after(observation.span, record, offset=held.offset):
                return outcome
            later = order(observation.span, span(vendor_time=held.as_of, offset=held.offset))
            return (Outcome.APPLIED if later > 0 else Outcome.STALE if later < 0
                    else Outcome.TIE_OPT_IN_LOST)
    return outcome


def _beyond_ledger(state: KeyState, observation: Observation) -> bool:
    horizon = state.horizon.get(observation.side)
    return horizon is not None and horizon.covers(observation)


def _takes_register(outcome: Outcome, observation: Observation,
                    register: Register | None) -> bool:
    """The observation becomes the register (rule 6)."""
    return outcome in (Outcome.APPLIED, Outcome.TIE_OPT_OUT_WON) or (
        outcome is Outcome.TIE_SAME_VALUE and _reaches_later(observation, register))


def reconcile(state: KeyState | None, observation: Observation, *,
              contact: ContactState | None = None, decided: bool = False) -> Decision:
    """Fold ``observation`` into ``state`` (``None``: nothing stored yet for the key);
    ``decided``: a fold already decided it (rule 3; only an opt-in is taken so)."""
    before = state if state is not None else KeyState(key=observation.key)
    if before.key != observation.key:
        raise ValueError("observation is for another key")
    if contact is not None and contact.suppressed:
        return Decision(state=before, outcome=Outcome.SUPPRESSED, commands=(), changed=False)

    # The state's parts are worked on apart and the state is built once, at the end (only
    # when one of them changed): this runs for every change of every batch.
    side = observation.side
    known = before.known.get(side)
    seen = Known.of(observation)
    register = before.register
    knowledge = before.known
    prune = False
    if decided and observation.opted_in:
        outcome = Outcome.DUPLICATE
    elif observation.carried:
        # Not a read of the side: only the register may move (a write of ours that lands after
        # it is then still known, and corrected, because the side's knowledge stays as read).
        outcome = _against_register(register, observation)
        if _takes_register(outcome, observation, register):
            register = Register.of(observation)
    elif observation.joined:
        outcome = Outcome.JOINED
        if register is not None and register.opted_in != observation.opted_in:
            as_of = seen.as_of if known is None else max(known.as_of, seen.as_of)
            knowledge = knowledge.with_(side, Known(
                opted_in=observation.opted_in, as_of=as_of,
                version=None if known is None else known.version, offset=observation.offset))
    elif _echo(before, observation):
        outcome = Outcome.ECHO
        if seen.is_newer_than(known):
            knowledge = knowledge.with_(side, seen)
            prune = True
    elif seen.same_as(known):
        outcome = Outcome.DUPLICATE
    else:
        if seen.is_newer_than(known):
            knowledge = knowledge.with_(side, seen)
        if observation.opted_in and _beyond_ledger(before, observation):
            outcome = Outcome.STALE
        else:
            outcome = _against_opt_out_read_back(
                before, observation, _against_register(register, observation))
            if _takes_register(outcome, observation, register):
                register = Register.of(observation)
        prune = True
    writes, horizon = before.writes, before.horizon
    if prune and (pruned := pruned_writes(writes.get(side), known=knowledge.get(side),
                                          horizon=horizon.get(side))) is not None:
        writes, horizon = writes.with_(side, pruned[0]), horizon.with_(side, pruned[1])
    commands = _outstanding(before.key, register, knowledge)
    pending = _pending(before.pending, commands)
    changed = (_moved(register, before.register) or _moved(knowledge, before.known)
               or _moved(pending, before.pending) or _moved(writes, before.writes)
               or _moved(horizon, before.horizon))
    after = before if not changed else KeyState(
        key=before.key, register=register, known=knowledge, pending=pending, writes=writes,
        horizon=horizon, revision=before.revision)
    return Decision(state=after, outcome=outcome, commands=commands, changed=changed)


# the change id of an opt-in decided again (rule 8), with its side: the stored state keeps
# what a side holds, not the id of the change it read
REOPENED = "reopened"


def reopen(state: KeyState, *, side: Side, closed: WriteRecord,
           uncertainty: timedelta) -> Decision | None:
    """Rule 8: ``state`` (with ``closed``'s write confirmed or forgotten already) after
    deciding again what ``side`` is known to hold, when it was taken for the echo of that
    write while it was in flight; None when that is not so, or the register does not move.

    ``closed``: the write's record as confirmed (with its window), or as it was in flight
    (``window_end`` None) when it is forgotten as surely never sent. ``uncertainty``: the
    side's clock's, as measured now.
    """
    known = state.known.get(side)
    register = state.register
    if (known is None or not known.opted_in or not closed.opted_in or known.version is not None
            or known.stamp is not None or register is None or register.opted_in
            or not in_write_window(known.as_of, side=side, start=closed.window_start, end=None)
            or (closed.window_end is not None and in_write_window(
                known.as_of, side=side, start=closed.window_start, end=closed.window_end))):
        return None
    observation = Observation(key=state.key, side=side, opted_in=True, origin_time=known.as_of,
                              change_id=f"{REOPENED}:{side}", offset=known.offset,
                              uncertainty=uncertainty + SECOND, clock_epoch=UNKNOWN_EPOCH)
    decision = reconcile(state.with_parts(known=state.known.with_(side, None)), observation)
    return None if decision.state.register == register else decision
