"""The batch fold kernel: :func:`common.domain.fold.fold_batch` over flat rows
(:mod:`common.domain.rows`) instead of frozen dataclasses, for the batch hot path.

The dataclass functions stay the executable specification: :func:`common.domain.reconcile`
(its rules 1-7), :func:`common.domain.fold.fold_batch` (its rules 1-4) and the rules they use
in :mod:`common.domain.clock`, :mod:`common.domain.state` and :mod:`common.domain.writes`.

Rules:

1. Each function here mirrors one function of the specification, named in its docstring, on
   rows: it states no rule of its own, and its constants are the specification's, in
   microseconds. A rule changes there first, then here.
2. ``tests/unit/domain/test_kernel.py`` holds the kernel to the specification on random
   histories: the same states, outcomes, history, parked observations, futures and commands.
3. A row is never changed in place: a state that does not change is the same row afterwards
   (told by identity, as :func:`common.domain.reconcile` tells an unchanged state).

Why: folding frozen dataclasses builds several objects per observation; rows are tuples of
ints, built in C. On the domain bench's batch (``python -m bench.kernel_cost``), CPU per
observation: ``fold_batch`` 15.4 µs, this kernel 2.4 µs. Converting dataclasses to rows and
back costs more than that saves (16 µs, mostly building the dataclasses again): the kernel is
for callers that hold rows (the ledger's columns, the messages' fields).
"""

from __future__ import annotations

from collections.abc import Container, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from common.domain.clock import SECOND, UNKNOWN_EPOCH, duration_us
from common.domain.fold import FUTURE_TIMESTAMP
from common.domain.reconcile import Outcome
from common.domain.rows import (
    DECISIONS,
    EMPTY_STATE,
    OUTCOMES,
    CommandRow,
    HistoryRow,
    HorizonRow,
    KnownRow,
    ObservationRow,
    Pair,
    PendingRow,
    RegisterRow,
    StateRow,
    WriteRow,
)
from common.domain.sides import SIDES
from common.domain.state import STEPPED
from common.domain.writes import IN_FLIGHT_LIMIT, MAX_WRITE_RECORDS, STAMP_RESOLUTION_US

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

APPLIED = OUTCOMES.index(Outcome.APPLIED)
STALE = OUTCOMES.index(Outcome.STALE)
TIE_OPT_OUT_WON = OUTCOMES.index(Outcome.TIE_OPT_OUT_WON)
TIE_OPT_IN_LOST = OUTCOMES.index(Outcome.TIE_OPT_IN_LOST)
TIE_SAME_VALUE = OUTCOMES.index(Outcome.TIE_SAME_VALUE)
ECHO = OUTCOMES.index(Outcome.ECHO)
JOINED = OUTCOMES.index(Outcome.JOINED)
DUPLICATE = OUTCOMES.index(Outcome.DUPLICATE)
SUPPRESSED = OUTCOMES.index(Outcome.SUPPRESSED)
FUTURE = DECISIONS.index(FUTURE_TIMESTAMP)

_SECOND_US = duration_us(SECOND)
_STEPPED_US = duration_us(STEPPED)
_IN_FLIGHT_LIMIT_US = duration_us(IN_FLIGHT_LIMIT)
_RESOLUTION_US = tuple(STAMP_RESOLUTION_US[side] for side in SIDES)
# A state row from its parts, in C (a named tuple's own constructor is a Python function).
_state_row = tuple.__new__


def _with(pair: Pair[T], side: int, value: T) -> Pair[T]:
    """``pair`` with ``side``'s value replaced (:meth:`common.domain.sides.PerSide.with_`)."""
    return (value, pair[1]) if side == 0 else (pair[0], value)


# -- time ------------------------------------------------------------------------------------

def _span(vendor: int, offset: int, uncertainty: int) -> tuple[int, int]:
    """:func:`common.domain.clock.span` (with :func:`~common.domain.clock.whole_second`)."""
    low = vendor - vendor % _SECOND_US - offset
    return low - uncertainty, low + _SECOND_US + uncertainty


def _against_register(register: RegisterRow | None, row: ObservationRow[Any]) -> tuple[int, bool]:
    """Rule 6 of :mod:`common.domain.reconcile`: the outcome of ``row`` against the register
    (``_against_register``, with ``_same_clock`` and :func:`common.domain.clock.order` of the
    two spans) and whether ``row`` becomes the register (``_takes_register``, with
    ``_reaches_later``)."""
    if register is None:
        return APPLIED, True
    r_opted_in, r_origin, r_side, _, r_offset, r_uncertainty, r_bounded, r_epoch = register
    _, _, side, opted_in, origin, _, _, _, _, offset, uncertainty, bounded, epoch = row
    vendor = origin if bounded is None else bounded
    r_vendor = r_origin if r_bounded is None else r_bounded
    same_clock = r_side == side and r_epoch == epoch != UNKNOWN_EPOCH
    if same_clock:
        mine, theirs = _span(vendor, 0, 0), _span(r_vendor, 0, 0)
    else:
        mine, theirs = _span(vendor, offset, uncertainty), _span(r_vendor, r_offset, r_uncertainty)
    if mine[0] >= theirs[1]:
        return APPLIED, True
    if theirs[0] >= mine[1]:
        return STALE, False
    if opted_in == r_opted_in:
        return TIE_SAME_VALUE, not same_clock and mine[1] > theirs[1]
    if not opted_in:
        return TIE_OPT_OUT_WON, True
    return TIE_OPT_IN_LOST, False


# -- the state's parts -----------------------------------------------------------------------

def _register_of(row: ObservationRow[Any]) -> RegisterRow:
    """:meth:`common.domain.state.Register.of`."""
    _, _, side, opted_in, origin, _, change_id, _, _, offset, uncertainty, bounded, epoch = row
    return opted_in, origin, side, change_id, offset, uncertainty, bounded, epoch


def _known_of(row: ObservationRow[Any]) -> KnownRow:
    """:meth:`common.domain.state.Known.of`."""
    _, _, _, opted_in, origin, version, _, _, _, offset, _, bounded, _ = row
    if bounded is None:
        return opted_in, origin, version, None, offset
    return opted_in, bounded, version, origin, offset


def _is_newer(known: KnownRow, existing: KnownRow | None) -> bool:
    """:meth:`common.domain.state.Known.is_newer_than`."""
    if existing is None:
        return True
    _, as_of, version, _, offset = known
    _, e_as_of, e_version, _, e_offset = existing
    if version is not None and e_version is not None:
        return version > e_version
    if abs(offset - e_offset) > _STEPPED_US:
        return as_of - offset > e_as_of - e_offset
    return as_of > e_as_of


def same_known(known: KnownRow, existing: KnownRow | None) -> bool:
    """:meth:`common.domain.state.Known.same_as`, on rows: the same state read again (what
    the reconciler folds as a duplicate)."""
    if existing is None:
        return False
    opted_in, as_of, version, stamp, _ = known
    e_opted_in, e_as_of, e_version, e_stamp, _ = existing
    return (opted_in == e_opted_in and version == e_version
            and (as_of if stamp is None else stamp) == (e_as_of if e_stamp is None else e_stamp))


def _covers(horizon: HorizonRow, row: ObservationRow[Any]) -> bool:
    """:meth:`common.domain.state.LedgerHorizon.covers`."""
    until, version = horizon
    if row.version is not None and version is not None:
        return row.version <= version
    return row.origin_us <= until


# -- the write ledger ------------------------------------------------------------------------

def _in_write_window(moment: int, *, side: int, start: int, end: int | None) -> bool:
    """:func:`common.domain.writes.in_write_window` (with its ``_window_floor``)."""
    if moment < start - start % _RESOLUTION_US[side]:
        return False
    return moment <= (end if end is not None else start + _IN_FLIGHT_LIMIT_US)


def _unversioned_opt_out(record: WriteRow) -> bool:
    """``_unversioned_opt_out`` of :mod:`common.domain.reconcile`."""
    return not record[0] and record[3] is not None and record[4] is None


def _began_after(change: tuple[int, int], record: WriteRow, *, offset: int,
                 uncertainty: int = 0) -> bool:
    """``_began_after`` of :mod:`common.domain.reconcile`."""
    start = _span(record[2], offset, uncertainty)
    return not start[0] >= change[1]


def _echo(register: RegisterRow | None, records: tuple[WriteRow, ...],
          row: ObservationRow[Any]) -> bool:
    """``_echo`` of :mod:`common.domain.reconcile`: rule 2 and its exception."""
    _, _, side, opted_in, origin, version = row[:6]
    found: WriteRow | None = None
    for record in records:
        r_opted_in, _, start, end, produced, _ = record
        if r_opted_in != opted_in:
            continue
        if produced is not None and version is not None:
            if produced == version:
                found = record
                break
            continue
        if _in_write_window(origin, side=side, start=start, end=end):
            found = record
            break
    if found is None or (found[3] is None and not opted_in):
        return False
    if register is None or not register[0] or register[2] == side or not _unversioned_opt_out(
            found):
        return True
    r_vendor = register[1] if register[6] is None else register[6]
    return not _began_after(_span(r_vendor, register[4], register[5]), found, offset=row[9],
                            uncertainty=row[10])


def _against_opt_out_read_back(register: RegisterRow | None, known: Pair[KnownRow | None],
                               writes: Pair[tuple[WriteRow, ...]], row: ObservationRow[Any],
                               outcome: int) -> int:
    """``_against_opt_out_read_back`` of :mod:`common.domain.reconcile`."""
    if outcome != APPLIED or not row[3] or register is None or register[0]:
        return outcome
    side = 1 - row[2]
    held = known[side]
    if held is None or held[0] or held[2] is not None or held[3] is not None:
        return outcome
    _, as_of, _, _, offset = held
    for record in writes[side]:
        if _unversioned_opt_out(record) and _in_write_window(as_of, side=side, start=record[2],
                                                             end=record[3]):
            vendor = row[4] if row[11] is None else row[11]
            mine = _span(vendor, row[9], row[10])
            if not _began_after(mine, record, offset=offset):
                return outcome
            theirs = _span(as_of, offset, 0)
            if mine[0] >= theirs[1]:
                return APPLIED
            return STALE if theirs[0] >= mine[1] else TIE_OPT_IN_LOST
    return outcome


def _widened(horizon: HorizonRow | None, record: WriteRow) -> HorizonRow:
    """:meth:`common.domain.state.LedgerHorizon.of` (``horizon`` None) and
    :meth:`~common.domain.state.LedgerHorizon.widened`."""
    _, _, start, end, version, _ = record
    reach = end if end is not None else start + _IN_FLIGHT_LIMIT_US
    if horizon is None:
        return reach, version
    until, kept_version = horizon
    if kept_version is not None and (version is None or kept_version > version):
        version = kept_version
    return max(until, reach), version


def _pruned(records: tuple[WriteRow, ...], *, known: KnownRow | None, horizon: HorizonRow | None
            ) -> tuple[tuple[WriteRow, ...], HorizonRow] | None:
    """:func:`common.domain.writes.pruned_writes`: the records kept and the horizon widened by
    the dropped ones, or ``None`` when none is dropped."""
    # a record still in flight that started before this has expired: the side has been seen
    # more than the in-flight limit after its start
    expiry = known[1] - _IN_FLIGHT_LIMIT_US if known is not None else None
    if len(records) <= MAX_WRITE_RECORDS:
        if expiry is None:
            return None
        for _, _, start, end, _, _ in records:
            if end is None and start < expiry:
                break
        else:
            return None  # nothing expired, and no more writes than are kept (the common case)
    kept: list[WriteRow] = []
    dropped: list[WriteRow] = []
    for r in sorted(records, key=lambda r: (r[3] is None, r[2])):
        expired = expiry is not None and r[3] is None and r[2] < expiry
        (dropped if expired else kept).append(r)
    writes = list(dict.fromkeys((r[0], r[1]) for r in kept))
    newest = set(writes[-MAX_WRITE_RECORDS:])
    dropped.extend(r for r in kept if (r[0], r[1]) not in newest)
    kept = [r for r in kept if (r[0], r[1]) in newest]
    if not dropped:
        return None
    for r in dropped:
        horizon = _widened(horizon, r)
    assert horizon is not None
    return tuple(kept), horizon


# -- reconcile -------------------------------------------------------------------------------

def outstanding_rows(register: RegisterRow | None, known: Pair[KnownRow | None]
                     ) -> tuple[CommandRow, ...]:
    """:func:`common.domain.reconcile.outstanding`: a command for every side not known to hold
    the register's value."""
    if register is None:
        return ()
    opted_in, origin, origin_side, change_id = register[:4]
    dynamics, dotdigital = known
    # spelt out for the two sides: a generator costs more than the rest of it
    if dynamics is not None and dynamics[0] == opted_in:
        if dotdigital is not None and dotdigital[0] == opted_in:
            return ()
        return ((1, opted_in, origin, origin_side, change_id),)
    if dotdigital is not None and dotdigital[0] == opted_in:
        return ((0, opted_in, origin, origin_side, change_id),)
    return ((0, opted_in, origin, origin_side, change_id),
            (1, opted_in, origin, origin_side, change_id))


def _pending(pending: Pair[PendingRow | None], commands: tuple[CommandRow, ...]
             ) -> Pair[PendingRow | None]:
    """``_pending`` of :mod:`common.domain.reconcile`: ``pending`` remembering ``commands``, the
    same tuple when it already did."""
    for side, opted_in, origin, _, _ in commands:
        write = (opted_in, origin)
        if pending[side] != write:
            pending = _with(pending, side, write)
    return pending


def reconcile_row(state: StateRow, row: ObservationRow[Any], *, decided: bool = False
                  ) -> tuple[StateRow, int, tuple[CommandRow, ...]]:
    """:func:`common.domain.reconcile.reconcile` (rules 2-7; suppression, rule 1, is the
    fold's): the state after ``row`` (``state`` itself when unchanged), the outcome's code and
    the outstanding commands."""
    register, known, pending, writes, horizon, revision = state
    _, _, side, opted_in, origin, _, _, carried, joined, offset, _, bounded, _ = row
    held = known[side]
    after_register, after_known = register, known
    prune = False
    if decided and opted_in:
        outcome = DUPLICATE
    elif carried:
        outcome, takes = _against_register(register, row)
        if takes:
            after_register = _register_of(row)
    elif joined:
        outcome = JOINED
        if register is not None and register[0] != opted_in:
            vendor = origin if bounded is None else bounded
            as_of = vendor if held is None else max(held[1], vendor)
            after_known = _with(known, side, (opted_in, as_of, None if held is None else held[2],
                                              None, offset))
    else:
        seen = _known_of(row)
        records = writes[side]
        if records and _echo(register, records, row):
            outcome = ECHO
            if _is_newer(seen, held):
                after_known = _with(known, side, seen)
                prune = True
        elif same_known(seen, held):
            outcome = DUPLICATE
        else:
            if _is_newer(seen, held):
                after_known = _with(known, side, seen)
            limit = horizon[side]
            if opted_in and limit is not None and _covers(limit, row):
                outcome = STALE
            else:
                outcome, takes = _against_register(register, row)
                if outcome == APPLIED and opted_in:
                    outcome = _against_opt_out_read_back(register, known, writes, row, outcome)
                    takes = outcome == APPLIED
                if takes:
                    after_register = _register_of(row)
            prune = True
    after_writes, after_horizon = writes, horizon
    if prune and writes[side] and (pruned := _pruned(writes[side], known=after_known[side],
                                                     horizon=horizon[side])) is not None:
        after_writes = _with(writes, side, pruned[0])
        after_horizon = _with(horizon, side, pruned[1])
    commands = outstanding_rows(after_register, after_known)
    after_pending = _pending(pending, commands)
    if ((after_register is register or after_register == register)
            and (after_known is known or after_known == known)
            and (after_pending is pending or after_pending == pending)
            and (after_writes is writes or after_writes == writes)
            and (after_horizon is horizon or after_horizon == horizon)):
        return state, outcome, commands
    return (_state_row(StateRow, (after_register, after_known, after_pending, after_writes,
                                  after_horizon, revision)), outcome, commands)


# -- the fold --------------------------------------------------------------------------------

def _history_row(row: ObservationRow[K], decision: int) -> HistoryRow[K]:
    """:meth:`common.domain.history.HistoryEntry.for_observation` (``corrected_time``: the
    observation's)."""
    key, _, side, opted_in, origin, _, change_id, _, _, offset, _, bounded, _ = row
    return (key, side, opted_in, origin, change_id, decision,
            (origin if bounded is None else bounded) - offset)


@dataclass(kw_only=True, slots=True)
class RowFold(Generic[K]):
    """:class:`common.domain.fold.Fold` over rows: ``states`` as loaded (updated as the batch
    changes them), ``changed`` the keys to save; ``outcomes`` and ``history`` decisions' codes
    (:data:`common.domain.rows.DECISIONS`); ``commands`` the outstanding commands of each key
    decided (not suppressed) as its last decision left them."""

    states: dict[K, StateRow]
    changed: set[K] = field(default_factory=set)
    outcomes: list[int] = field(default_factory=list)
    history: list[HistoryRow[K]] = field(default_factory=list)
    parked: list[ObservationRow[K]] = field(default_factory=list)
    futures: list[int] = field(default_factory=list)
    commands: dict[K, tuple[CommandRow, ...]] = field(default_factory=dict)

    def observe(self, row: ObservationRow[K], *, suppressed: bool, decided: bool = False
                ) -> int:
        """:meth:`common.domain.fold.Fold.observe`: fold ``row`` in (``suppressed``: its
        contact's state; ``decided``: a fold already decided it), and say its outcome's code."""
        key = row.key
        if suppressed:
            outcome = SUPPRESSED
            self.parked.append(row)
        else:
            before = self.states.get(key, EMPTY_STATE)
            after, outcome, self.commands[key] = reconcile_row(before, row, decided=decided)
            if after is not before:
                self.states[key] = after
                self.changed.add(key)
        if outcome != DUPLICATE:
            if row.bounded_us is not None:
                self.futures.append(row.side)
                self.history.append(_history_row(row, FUTURE))
            self.history.append(_history_row(row, outcome))
        self.outcomes.append(outcome)
        return outcome

    def changed_states(self) -> dict[K, StateRow]:
        return {key: self.states[key] for key in self.changed}


def fold_rows(states: Mapping[K, StateRow], rows: Iterable[ObservationRow[K]], *,
              suppressed: Container[object],
              decided: Container[ObservationRow[K]] = ()) -> RowFold[K]:
    """:func:`common.domain.fold.fold_batch` (rules 1-4) over rows: ``rows`` folded in order
    into ``states`` (not modified), a row whose contact is in ``suppressed`` parked, a row in
    ``decided`` already decided by a fold."""
    fold: RowFold[K] = RowFold(states=dict(states))
    observe = fold.observe
    if not decided:
        for row in rows:
            observe(row, suppressed=row.contact in suppressed)
        return fold
    for row in rows:
        observe(row, suppressed=row.contact in suppressed, decided=row in decided)
    return fold
