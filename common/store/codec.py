"""Compact serialisation of a key's sync state (one orjson array per row).

The key and the revision live in indexed columns, not in the blob. The leading number is the
format version, so the layout can change without guessing.

- Format 2 (written): the state's flat row (:class:`common.domain.rows.StateRow`) as nested
  arrays: times and clock offsets integer microseconds since the Unix epoch, sides their codes
  (0 Dynamics, 1 dotdigital), booleans ``true``/``false``. The batch hot path decodes it
  straight into rows, with no time parsed and no object built
  (:func:`decode_row`, :func:`encode_row`); the dataclasses convert from the row.
- Format 1 (read only, what ledgers written before hold): ISO-8601 UTC time strings, booleans
  0/1, per-side parts side by side, the time-base fields left out when they were zero. A state
  read in format 1 is written back in format 2 by its next save.

Why not a column per field: on SQLite, 26 columns (and the write records beside them) loaded
and saved 2,000 state rows at 4.7 and 6.4 µs each, against 3.0 and 1.6 µs for this one array
(``python -m bench.state_layout_cost``); PostgreSQL would take one unnested array per column.

Table columns hold times as integer microseconds since the Unix epoch (``to_us``), which sort
and compare the same in SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import orjson

from common.domain import (
    KeyState,
    Known,
    LedgerHorizon,
    PendingWrite,
    PreferenceKey,
    Register,
    Side,
    WriteRecord,
)
from common.domain.clock import ZERO, from_us, to_us
from common.domain.rows import KeyTuple, StateRow, key_of, key_state, state_row
from common.domain.sides import SIDES, per_side

FORMAT = 2
# What ledgers written before format 2 hold (read, never written).
FORMAT_1 = 1
__all__ = ["FORMAT", "decode_row", "decode_state", "encode_row", "encode_state", "from_us",
           "to_us"]


_time = datetime.fromisoformat


def _opt_time(value: str | None) -> datetime | None:
    return None if value is None else _time(value)


def _d_register(raw: list[Any] | None) -> Register | None:
    if raw is None:
        return None
    register = Register(opted_in=bool(raw[0]), origin_time=_time(raw[1]),
                        origin_side=SIDES[raw[2]], change_id=raw[3])
    if len(raw) > 4:
        register = replace(register, offset=timedelta(microseconds=raw[4]),
                           uncertainty=timedelta(microseconds=raw[5]),
                           bounded_time=_opt_time(raw[6]),
                           clock_epoch=int(raw[7]) if len(raw) > 7 else 0)
    return register


def _d_known(raw: list[Any] | None) -> Known | None:
    if raw is None:
        return None
    return Known(opted_in=bool(raw[0]), as_of=_time(raw[1]), version=raw[2],
                 stamp=_opt_time(raw[3]) if len(raw) > 3 else None,
                 offset=timedelta(microseconds=raw[4]) if len(raw) > 4 else ZERO)


def _d_pending(raw: list[Any] | None) -> PendingWrite | None:
    if raw is None:
        return None
    return PendingWrite(opted_in=bool(raw[0]), origin_time=_time(raw[1]))


def _d_records(side: Side, raw: list[list[Any]]) -> tuple[WriteRecord, ...]:
    return tuple(
        WriteRecord(side=side, opted_in=bool(r[0]), register_origin_time=_time(r[1]),
                    window_start=_time(r[2]), window_end=_opt_time(r[3]),
                    produced_version=r[4], written_at=_opt_time(r[5]))
        for r in raw
    )


def _d_horizon(raw: list[Any] | None) -> LedgerHorizon | None:
    return None if raw is None else LedgerHorizon(until=_time(raw[0]), version=raw[1])


def _decode_format_1(key: PreferenceKey, revision: int, raw: list[Any]) -> KeyState:
    (_, register, k_dyn, k_dd, p_dyn, p_dd, w_dyn, w_dd, h_dyn, h_dd) = raw
    return KeyState(
        key=key,
        register=_d_register(register),
        known=per_side(_d_known(k_dyn), _d_known(k_dd)),
        pending=per_side(_d_pending(p_dyn), _d_pending(p_dd)),
        writes=per_side(_d_records("dynamics", w_dyn), _d_records("dotdigital", w_dd)),
        horizon=per_side(_d_horizon(h_dyn), _d_horizon(h_dd)),
        revision=revision,
    )


def encode_row(row: StateRow) -> bytes:
    """A state's row (its key and revision left out: those are columns), in format 2."""
    return orjson.dumps([FORMAT, row[0], row[1], row[2], row[3], row[4]])


def encode_state(state: KeyState) -> bytes:
    """The state without its key and revision (those are columns), in format 2."""
    return encode_row(state_row(state))


def _part(raw: list[Any] | None) -> Any:
    return None if raw is None else tuple(raw)


# A state row from its parts, in C (a named tuple's own constructor is a Python function).
_row = tuple.__new__


def _loaded(blob: bytes, key: PreferenceKey | KeyTuple) -> list[Any]:
    raw = orjson.loads(blob)
    if not isinstance(raw, list) or not raw or raw[0] not in (FORMAT, FORMAT_1):
        k = key if isinstance(key, PreferenceKey) else key_of(key)
        raise ValueError(f"unknown key-state format for {k.account}/{k.preference_id}")
    return raw


def _row_of(raw: list[Any], revision: int) -> StateRow:
    """Format 2's parts as a row: each part a tuple again (JSON has only arrays)."""
    _, register, known, pending, writes, horizon = raw
    return _row(StateRow, (
        None if register is None else tuple(register),
        (_part(known[0]), _part(known[1])),
        (_part(pending[0]), _part(pending[1])),
        (tuple(map(tuple, writes[0])), tuple(map(tuple, writes[1]))),
        (_part(horizon[0]), _part(horizon[1])),
        revision))


def decode_row(key: PreferenceKey | KeyTuple, revision: int, blob: bytes) -> StateRow:
    """The row of a stored state (``key`` names it in errors, and decodes format 1; a
    :class:`PreferenceKey` is made of a key's parts only then)."""
    raw = _loaded(blob, key)
    if raw[0] == FORMAT:
        return _row_of(raw, revision)
    k = key if isinstance(key, PreferenceKey) else key_of(key)
    return state_row(_decode_format_1(k, revision, raw))


def decode_state(key: PreferenceKey, revision: int, blob: bytes) -> KeyState:
    raw = _loaded(blob, key)
    if raw[0] == FORMAT:
        return key_state(key, _row_of(raw, revision))
    return _decode_format_1(key, revision, raw)


def decode_rows(rows: Iterable[Any]) -> dict[KeyTuple, StateRow]:
    """The state rows of stored ``(account, email, preference_id, revision, state)`` rows, by
    key tuple."""
    out: dict[KeyTuple, StateRow] = {}
    for account, email, preference_id, revision, blob in rows:
        key = (account, email, preference_id)
        out[key] = decode_row(key, revision, blob)
    return out
