"""Flat rows of the sync state and of observations: what the batch fold kernel
(:mod:`common.domain.kernel`) works on, and their conversion from and to the dataclasses.

The layout is the stored state's (:mod:`common.store.codec`), with integers where the blob has
strings, so that each part maps onto integer ledger columns:

- times are integer microseconds since the Unix epoch (:func:`common.domain.clock.to_us`),
  clock offsets and uncertainties integer microseconds, sides their codes
  (:data:`common.domain.sides.SIDE_CODES`: 0 Dynamics, 1 dotdigital), booleans bool or 0/1;
- a state row holds the register and, per side (indexed by side code), what the side is known
  to hold, the pending write, the write records (a tuple of tuples) and the ledger horizon;
- a state row's parts are plain tuples, in the field order of their dataclass (named below):
  they are built on every change of a batch, where a named tuple's constructor costs several
  times more; the state row and the observation row are named tuples (the kernel builds state
  rows with ``tuple.__new__``, in C).

Converting is exact both ways: a state converted to a row and back is equal to it.
"""

from __future__ import annotations

from collections.abc import Hashable
from datetime import datetime
from typing import Generic, NamedTuple, TypeVar

from common.domain.clock import as_utc, duration_from_us, duration_us, from_us, to_us
from common.domain.commands import WriteCommand
from common.domain.fold import FUTURE_TIMESTAMP
from common.domain.history import HistoryEntry
from common.domain.identity import PreferenceKey
from common.domain.observation import Observation
from common.domain.reconcile import Outcome
from common.domain.sides import SIDE_CODES, SIDES, per_side
from common.domain.state import KeyState, Known, LedgerHorizon, PendingWrite, Register, WriteRecord

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

# :class:`Register`: opted_in, origin_us, origin_side, change_id, offset_us, uncertainty_us,
# bounded_us, clock_epoch
RegisterRow = tuple[bool, int, int, str, int, int, int | None, int]
# :class:`Known`: opted_in, as_of_us, version, stamp_us, offset_us
KnownRow = tuple[bool, int, int | None, int | None, int]
# :class:`PendingWrite`: opted_in, origin_us
PendingRow = tuple[bool, int]
# :class:`WriteRecord` (its side is the side it is kept for): opted_in, register_origin_us,
# window_start_us, window_end_us, produced_version, written_at_us
WriteRow = tuple[bool, int, int, int | None, int | None, int | None]
# :class:`LedgerHorizon`: until_us, version
HorizonRow = tuple[int, int | None]
# :class:`WriteCommand` of a key: side, opted_in, origin_us, origin_side, change_id
CommandRow = tuple[int, bool, int, int, str]
# :class:`HistoryEntry` of an observation: key, side, opted_in, origin_us, change_id, decision
# (a code of :data:`DECISIONS`), corrected_us; the batch's recorded_at is the caller's
HistoryRow = tuple[K, int, bool, int, str, int, int]
# One value per side, indexed by side code.
Pair = tuple[T, T]

# A decision's code: its place here (the outcomes, then ``future_timestamp``).
OUTCOMES: tuple[Outcome, ...] = tuple(Outcome)
DECISIONS: tuple[str, ...] = (*(str(o) for o in OUTCOMES), FUTURE_TIMESTAMP)

# The key of the rows the converters make: a :class:`PreferenceKey`'s parts (a tuple hashes in
# C, a frozen dataclass in Python).
KeyTuple = tuple[str, str, int]


class StateRow(NamedTuple):
    """A :class:`KeyState` without its key (the key of the mapping that holds it)."""

    register: RegisterRow | None
    known: Pair[KnownRow | None]
    pending: Pair[PendingRow | None]
    writes: Pair[tuple[WriteRow, ...]]
    horizon: Pair[HorizonRow | None]
    revision: int = 0


# A key with nothing stored yet.
EMPTY_STATE = StateRow(register=None, known=(None, None), pending=(None, None), writes=((), ()),
                       horizon=(None, None))


class ObservationRow(NamedTuple, Generic[K]):
    """An :class:`Observation`, with the key of its state and the contact whose suppression
    applies to it (dotdigital's contact: the key's email)."""

    key: K
    contact: Hashable
    side: int
    opted_in: bool
    origin_us: int
    version: int | None
    change_id: str
    carried: bool
    joined: bool
    offset_us: int
    uncertainty_us: int
    bounded_us: int | None
    clock_epoch: int


def _opt_us(moment: datetime | None) -> int | None:
    return None if moment is None else to_us(moment)


def _opt_time(value: int | None) -> datetime | None:
    return None if value is None else from_us(value)


def key_tuple(key: PreferenceKey) -> KeyTuple:
    return key.account, key.email, key.preference_id


def key_of(key: KeyTuple) -> PreferenceKey:
    account, email, preference_id = key
    return PreferenceKey.trusted(account=account, email=email, preference_id=preference_id)


def observation_row(observation: Observation) -> ObservationRow[KeyTuple]:
    """``observation`` as a row keyed by :func:`key_tuple`, its contact the key's email."""
    o = observation
    return ObservationRow(
        key=key_tuple(o.key), contact=o.key.email, side=SIDE_CODES[o.side], opted_in=o.opted_in,
        origin_us=to_us(o.origin_time), version=o.version, change_id=o.change_id,
        carried=o.carried, joined=o.joined, offset_us=duration_us(o.offset),
        uncertainty_us=duration_us(o.uncertainty), bounded_us=_opt_us(o.bounded_time),
        clock_epoch=o.clock_epoch)


def observation_of_row(row: ObservationRow[KeyTuple]) -> Observation:
    """The observation ``row`` holds (:func:`observation_row` the other way)."""
    return Observation.trusted(
        key=key_of(row.key), side=SIDES[row.side], opted_in=bool(row.opted_in),
        origin_time=from_us(row.origin_us), version=row.version, change_id=row.change_id,
        carried=bool(row.carried), joined=bool(row.joined),
    ).placed(offset=duration_from_us(row.offset_us),
             uncertainty=duration_from_us(row.uncertainty_us),
             bounded_time=_opt_time(row.bounded_us), clock_epoch=row.clock_epoch)


def _register_row(r: Register | None) -> RegisterRow | None:
    if r is None:
        return None
    return (r.opted_in, to_us(r.origin_time), SIDE_CODES[r.origin_side], r.change_id,
            duration_us(r.offset), duration_us(r.uncertainty), _opt_us(r.bounded_time),
            r.clock_epoch)


def _known_row(k: Known | None) -> KnownRow | None:
    if k is None:
        return None
    return k.opted_in, to_us(k.as_of), k.version, _opt_us(k.stamp), duration_us(k.offset)


def _pending_row(p: PendingWrite | None) -> PendingRow | None:
    return None if p is None else (p.opted_in, to_us(p.origin_time))


def _write_row(w: WriteRecord) -> WriteRow:
    return (w.opted_in, to_us(w.register_origin_time), to_us(w.window_start),
            _opt_us(w.window_end), w.produced_version, _opt_us(w.written_at))


def _horizon_row(h: LedgerHorizon | None) -> HorizonRow | None:
    return None if h is None else (to_us(h.until), h.version)


def state_row(state: KeyState) -> StateRow:
    """``state`` as a row (its key left out)."""
    known, pending, writes, horizon = state.known, state.pending, state.writes, state.horizon
    return StateRow(
        register=_register_row(state.register),
        known=(_known_row(known.dynamics), _known_row(known.dotdigital)),
        pending=(_pending_row(pending.dynamics), _pending_row(pending.dotdigital)),
        writes=(tuple(map(_write_row, writes.dynamics)),
                tuple(map(_write_row, writes.dotdigital))),
        horizon=(_horizon_row(horizon.dynamics), _horizon_row(horizon.dotdigital)),
        revision=state.revision)


def _register(raw: RegisterRow | None) -> Register | None:
    if raw is None:
        return None
    opted_in, origin, side, change_id, offset, uncertainty, bounded, epoch = raw
    return Register(opted_in=bool(opted_in), origin_time=from_us(origin), origin_side=SIDES[side],
                    change_id=change_id, offset=duration_from_us(offset),
                    uncertainty=duration_from_us(uncertainty),
                    bounded_time=_opt_time(bounded), clock_epoch=epoch)


def _known(raw: KnownRow | None) -> Known | None:
    if raw is None:
        return None
    opted_in, as_of, version, stamp, offset = raw
    return Known(opted_in=bool(opted_in), as_of=from_us(as_of), version=version,
                 stamp=_opt_time(stamp), offset=duration_from_us(offset))


def _pending(raw: PendingRow | None) -> PendingWrite | None:
    return None if raw is None else PendingWrite(opted_in=bool(raw[0]), origin_time=from_us(raw[1]))


def _records(side: int, raw: tuple[WriteRow, ...]) -> tuple[WriteRecord, ...]:
    return tuple(
        WriteRecord(side=SIDES[side], opted_in=bool(opted_in), register_origin_time=from_us(origin),
                    window_start=from_us(start), window_end=_opt_time(end),
                    produced_version=version, written_at=_opt_time(written_at))
        for opted_in, origin, start, end, version, written_at in raw)


def _horizon(raw: HorizonRow | None) -> LedgerHorizon | None:
    return None if raw is None else LedgerHorizon(until=from_us(raw[0]), version=raw[1])


def key_state(key: PreferenceKey, row: StateRow) -> KeyState:
    """The state ``row`` holds for ``key``."""
    register, known, pending, writes, horizon, revision = row
    return KeyState(
        key=key, register=_register(register),
        known=per_side(_known(known[0]), _known(known[1])),
        pending=per_side(_pending(pending[0]), _pending(pending[1])),
        writes=per_side(_records(0, writes[0]), _records(1, writes[1])),
        horizon=per_side(_horizon(horizon[0]), _horizon(horizon[1])),
        revision=revision)


def command_row(command: WriteCommand) -> CommandRow:
    """``command`` as a row (its key left out; :func:`write_command` the other way)."""
    return (SIDE_CODES[command.side], command.opted_in, to_us(command.origin_time),
            SIDE_CODES[command.origin_side], command.change_id)


def write_command(key: PreferenceKey, row: CommandRow) -> WriteCommand:
    side, opted_in, origin, origin_side, change_id = row
    return WriteCommand(key=key, side=SIDES[side], opted_in=bool(opted_in),
                        origin_time=from_us(origin), origin_side=SIDES[origin_side],
                        change_id=change_id)


def history_entry(row: HistoryRow[KeyTuple], *, recorded_at: datetime) -> HistoryEntry:
    key, side, opted_in, origin, change_id, decision, corrected = row
    account, email, preference_id = key
    return HistoryEntry.trusted(
        account=account, email=email, preference_id=preference_id, side=SIDES[side],
        opted_in=bool(opted_in), origin_time=from_us(origin), change_id=change_id,
        decision=DECISIONS[decision], recorded_at=as_utc(recorded_at), corrected_time=from_us(corrected))
