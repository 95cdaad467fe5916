"""The writer's write-ledger rules (:mod:`common.domain.writes`) on flat rows
(:mod:`common.domain.rows`), for the batch hot path: what :mod:`common.domain.kernel` is to the
fold, this module is to the writer.

Rules (the kernel's, :mod:`common.domain.kernel`):

1. Each function here mirrors one function of :mod:`common.domain.writes`, named in its
   docstring, on rows: it states no rule of its own and reuses the kernel's mirrors of the rules
   it shares with the fold (which record is pruned, which knowledge is newer). A rule changes in
   the specification first, then here.
2. ``tests/unit/domain/test_kernel_writes.py`` holds these functions to the specification on
   random states, commands and write windows: the same states, the same answers, the same
   errors.
3. A row is never changed in place: a state that does not change is the same row afterwards.

Why: the writer begins and records every write it makes. On the kernel bench's writes (every
command a realistic batch leaves outstanding, 1,506; ``python -m bench.kernel_cost``), CPU per
write for begin and record: the dataclasses 11.5-12.2 µs, rows 2.3-2.5 µs.

Times are integer microseconds since the Unix epoch, already in UTC: the specification's
``as_utc`` conversions (and its refusal of naive times) have no counterpart on rows.
``settle`` of :mod:`common.domain.reconcile` has no mirror here: the writer does not call it
(the fold's :func:`common.domain.kernel.outstanding_rows` is its part on rows).
"""

from __future__ import annotations

from common.domain.clock import UNKNOWN_EPOCH
from common.domain.kernel import (
    _SECOND_US,
    _history_row,
    _in_write_window,
    _is_newer,
    _pruned,
    _state_row,
    _with,
    reconcile_row,
)
from common.domain.reconcile import REOPENED
from common.domain.rows import (
    CommandRow,
    HistoryRow,
    KeyTuple,
    KnownRow,
    ObservationRow,
    StateRow,
    WriteRow,
)
from common.domain.sides import SIDE_CODES, SIDES

DOTDIGITAL = SIDE_CODES["dotdigital"]


def _in_flight_same_write(record: WriteRow, command: CommandRow) -> bool:
    """``record.in_flight and _same_write(record, command)`` of :mod:`common.domain.writes`: a
    record, not yet confirmed, of the write ``command`` asks for (same value, same register
    change)."""
    return record[3] is None and record[0] == command[1] and record[1] == command[2]


def prune_writes_row(state: StateRow, *, side: int) -> StateRow:
    """:func:`common.domain.writes.prune_writes`: ``side``'s expired in-flight records and all
    but the newest writes' records dropped, the horizon widened by them (the kernel's
    ``_pruned``); ``state`` itself when none is dropped."""
    register, known, pending, writes, horizon, revision = state
    pruned = _pruned(writes[side], known=known[side], horizon=horizon[side])
    if pruned is None:
        return state
    kept, widened = pruned
    return _state_row(StateRow, (register, known, pending, _with(writes, side, kept),
                                 _with(horizon, side, widened), revision))


def begin_write_row(state: StateRow, command: CommandRow, *, window_start_us: int) -> StateRow:
    """:func:`common.domain.writes.begin_write`: ``command`` recorded as in flight from
    vendor-clock ``window_start_us``, then the side's records pruned; ``state`` itself when a
    record of the same write is already in flight (it keeps its earlier start)."""
    side, opted_in, origin = command[:3]
    records = state.writes[side]
    for r in records:
        if _in_flight_same_write(r, command):
            return state
    register, known, pending, writes, horizon, revision = state
    record: WriteRow = (opted_in, origin, window_start_us, None, None, None)
    return prune_writes_row(
        _state_row(StateRow, (register, known, pending, _with(writes, side, (*records, record)),
                              horizon, revision)), side=side)


def record_write_row(state: StateRow, command: CommandRow, *, produced_version: int | None,
                     window_start_us: int, window_end_us: int, written_at_us: int,
                     offset_us: int = 0, read_before_us: int | None = None) -> StateRow:
    """:func:`common.domain.writes.record_write`: a successful write of ``command`` recorded,
    closing its in-flight record (whose earlier start the record's window keeps), what the side
    is known to hold moved to the write as of this attempt's start (or, when the other value
    was read inside the window and the register follows it, taken to be the write's; or when
    it is the change read just before the write, ``read_before_us``), then the side's records
    pruned.

    Raises ``ValueError`` when ``window_end_us`` is before ``window_start_us``.
    """
    if window_end_us < window_start_us:
        raise ValueError("window_end is before window_start")
    side, opted_in, origin = command[:3]
    register, known, pending, writes, horizon, revision = state
    others: list[WriteRow] = []
    first_start_us = window_start_us
    for r in writes[side]:
        if _in_flight_same_write(r, command):
            first_start_us = min(first_start_us, r[2])
        else:
            others.append(r)
    record: WriteRow = (opted_in, origin, first_start_us, window_end_us, produced_version,
                        written_at_us)
    # Dataverse without the new row version: only the echo tells what the row holds.
    if side == DOTDIGITAL or produced_version is not None:
        wrote: KnownRow = (opted_in, window_start_us, produced_version, None, offset_us)
        read = known[side]
        if _is_newer(wrote, read) or (read is not None and read_before_us is not None
                                      and read[3] is None and read[1] == read_before_us):
            known = _with(known, side, wrote)
        elif (read is not None and produced_version is None and read[0] != opted_in
              and not _is_newer(read, (read[0], window_end_us, None, None, offset_us))
              and register is not None and register[0] == read[0]):
            # the other value read inside our window: the side is taken to hold our write
            known = _with(known, side, (opted_in, read[1], produced_version, None, offset_us))
    return prune_writes_row(
        _state_row(StateRow, (register, known, pending, _with(writes, side, (*others, record)),
                              horizon, revision)), side=side)


def abandon_write_row(state: StateRow, command: CommandRow) -> StateRow:
    """:func:`common.domain.writes.abandon_write`: the in-flight record of ``command``'s write
    forgotten; ``state`` itself when there is none."""
    side = command[0]
    records = state.writes[side]
    kept = tuple(r for r in records if not _in_flight_same_write(r, command))
    if len(kept) == len(records):
        return state
    register, known, pending, writes, horizon, revision = state
    return _state_row(StateRow, (register, known, pending, _with(writes, side, kept), horizon,
                                 revision))


def in_flight_record_row(state: StateRow, command: CommandRow) -> WriteRow | None:
    """The record of ``command``'s write while it is in flight (what :func:`record_write_row`
    closes and :func:`abandon_write_row` forgets), if there is one."""
    for r in state.writes[command[0]]:
        if _in_flight_same_write(r, command):
            return r
    return None


def reopen_row(state: StateRow, *, key: KeyTuple, side: int, closed: WriteRow,
               uncertainty_us: int) -> tuple[StateRow, HistoryRow[KeyTuple]] | None:
    """:func:`common.domain.reconcile.reopen` (rule 8): the state after deciding again what
    ``side`` is known to hold, and its history row; None when that is not so, or the register
    does not move."""
    register, known = state[0], state[1]
    held = known[side]
    if (held is None or not held[0] or not closed[0] or held[2] is not None
            or held[3] is not None or register is None or register[0]
            or not _in_write_window(held[1], side=side, start=closed[2], end=None)
            or (closed[3] is not None and _in_write_window(held[1], side=side, start=closed[2],
                                                           end=closed[3]))):
        return None
    row = ObservationRow(key, key[1], side, True, held[1], None, f"{REOPENED}:{SIDES[side]}",
                         False, False, held[4], uncertainty_us + _SECOND_US, None, UNKNOWN_EPOCH)
    cleared: StateRow = _state_row(StateRow, (register, _with(known, side, None), *state[2:]))
    after, outcome, _ = reconcile_row(cleared, row)
    if after.register == register:
        return None
    return after, _history_row(row, outcome)


def is_superseded_row(state: StateRow, command: CommandRow) -> bool:
    """:func:`common.domain.writes.is_superseded`: the register has moved past ``command`` (or
    the side's pending write has)."""
    register = state.register
    side, opted_in, origin = command[:3]
    if register is None or register[0] != opted_in or register[1] != origin:
        return True
    pending = state.pending[side]
    return pending is not None and (pending[0] != opted_in or pending[1] != origin)


def writer_should_apply_row(state: StateRow, command: CommandRow, *, suppressed: bool) -> bool:
    """:func:`common.domain.writes.writer_should_apply` (``suppressed``: the contact's state):
    not suppressed, not superseded, and the side not known to hold the value already."""
    if suppressed or is_superseded_row(state, command):
        return False
    known = state.known[command[0]]
    return known is None or known[0] != command[1]
