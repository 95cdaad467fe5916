"""Compact serialisation of a key's sync state (one orjson array per row).

The key itself lives in indexed columns, not in the blob. Inside the blob times are ISO-8601
UTC strings (orjson writes them natively and ``datetime.fromisoformat`` reads them back, both in
C: several times faster than arithmetic in Python), booleans 0/1, sides 0 (Dynamics) /
1 (dotdigital). The leading number is the format version, so the layout can change without
guessing. Table columns hold times as integer microseconds since the Unix epoch (``to_us``),
which sort and compare the same in SQLite and PostgreSQL.
"""

from __future__ import annotations

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
from common.domain.clock import duration_us as _us
from common.domain.sides import SIDE_CODES, SIDES, per_side

FORMAT = 1
__all__ = ["FORMAT", "decode_state", "encode_state", "from_us", "to_us"]


_time = datetime.fromisoformat


def _opt_time(value: str | None) -> datetime | None:
    return None if value is None else _time(value)


def _register(r: Register | None) -> list[Any] | None:
    if r is None:
        return None
    raw = [int(r.opted_in), r.origin_time, SIDE_CODES[r.origin_side], r.change_id]
    if r.offset or r.uncertainty or r.bounded_time is not None or r.clock_epoch:
        # the time base it won in (left out when there was none, as before it existed)
        raw += [_us(r.offset), _us(r.uncertainty), r.bounded_time]
        if r.clock_epoch:
            raw.append(r.clock_epoch)
    return raw


def _known(k: Known | None) -> list[Any] | None:
    if k is None:
        return None
    raw = [int(k.opted_in), k.as_of, k.version]
    if k.stamp is not None or k.offset:
        raw.append(k.stamp)
    if k.offset:
        raw.append(_us(k.offset))
    return raw


def _pending(p: PendingWrite | None) -> list[Any] | None:
    return None if p is None else [int(p.opted_in), p.origin_time]


def _record(w: WriteRecord) -> list[Any]:
    return [int(w.opted_in), w.register_origin_time, w.window_start, w.window_end,
            w.produced_version, w.written_at]


def _horizon(h: LedgerHorizon | None) -> list[Any] | None:
    return None if h is None else [h.until, h.version]


def encode_state(state: KeyState) -> bytes:
    """The state without its key and revision (those are columns)."""
    return orjson.dumps([
        FORMAT,
        _register(state.register),
        _known(state.known.dynamics), _known(state.known.dotdigital),
        _pending(state.pending.dynamics), _pending(state.pending.dotdigital),
        [_record(w) for w in state.writes.dynamics],
        [_record(w) for w in state.writes.dotdigital],
        _horizon(state.horizon.dynamics), _horizon(state.horizon.dotdigital),
    ])


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


def decode_state(key: PreferenceKey, revision: int, blob: bytes) -> KeyState:
    raw = orjson.loads(blob)
    if not isinstance(raw, list) or not raw or raw[0] != FORMAT:
        raise ValueError(f"unknown key-state format for {key.account}/{key.preference_id}")
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
