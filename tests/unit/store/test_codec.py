"""The stored form of a key's state: format 2 round trips exactly, to dataclasses and to rows
alike; format 1 (what ledgers written before hold) is still read; anything else is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import given

from common import domain
from common.domain import KeyState, PreferenceKey
from common.domain.rows import state_row
from common.store.codec import FORMAT, decode_row, decode_state, encode_row, encode_state
from tests.unit.domain.builders import examples
from tests.unit.domain.test_kernel import KEYS, key_states

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
KEY = PreferenceKey(account="acme", email="ann@example.com", preference_id=7)

# Written by the format-1 encoder, with every field set: a ledger from before format 2 holds
# states such as this one.
FORMAT_1_FULL = (
    b'[1,[0,"2026-03-01T12:00:00.123456+00:00",1,"dd:1",250000,40000,'
    b'"2026-03-01T12:00:03+00:00",2],[1,"2026-03-01T12:00:00+00:00",9000000001],'
    b'[0,"2026-03-01T12:00:00.005000+00:00",null,"2026-03-01T14:00:00+00:00",-30000],'
    b'[0,"2026-03-01T12:00:00+00:00"],null,[[0,"2026-03-01T12:00:00+00:00",'
    b'"2026-03-01T12:00:00+00:00","2026-03-01T12:00:01+00:00",9000000002,'
    b'"2026-03-01T12:00:01+00:00"]],[[1,"2026-03-01T12:00:00+00:00",'
    b'"2026-03-01T12:00:02+00:00",null,null,null]],["2026-03-01T12:00:00+00:00",7],null]')
FORMAT_1_SHORT = b'[1,[1,"2026-03-01T12:00:00+00:00",0,"dyn:2"],null,null,null,null,[],[],null,null]'


def full_state() -> KeyState:
    return KeyState(
        key=KEY,
        register=domain.Register(opted_in=False, origin_time=T + timedelta(microseconds=123456),
                          origin_side="dotdigital", change_id="dd:1",
                          offset=timedelta(milliseconds=250),
                          uncertainty=timedelta(milliseconds=40),
                          bounded_time=T + timedelta(seconds=3), clock_epoch=2),
        known=domain.PerSide(dynamics=domain.Known(opted_in=True, as_of=T, version=9_000_000_001),
                      dotdigital=domain.Known(opted_in=False, as_of=T + timedelta(milliseconds=5),
                                       stamp=T + timedelta(hours=2),
                                       offset=timedelta(milliseconds=-30))),
        pending=domain.PerSide(dynamics=domain.PendingWrite(opted_in=False, origin_time=T), dotdigital=None),
        writes=domain.PerSide(
            dynamics=(domain.WriteRecord(side="dynamics", opted_in=False, register_origin_time=T,
                                  window_start=T, window_end=T + timedelta(seconds=1),
                                  produced_version=9_000_000_002,
                                  written_at=T + timedelta(seconds=1)),),
            dotdigital=(domain.WriteRecord(side="dotdigital", opted_in=True, register_origin_time=T,
                                    window_start=T + timedelta(seconds=2)),)),
        horizon=domain.PerSide(dynamics=domain.LedgerHorizon(until=T, version=7), dotdigital=None))


@examples(500)
@given(state=key_states(KEYS[0]))
def test_a_state_round_trips_exactly_as_a_state_and_as_a_row(state: KeyState) -> None:
    blob = encode_state(state)

    assert decode_state(state.key, state.revision, blob) == state
    assert decode_row(state.key, state.revision, blob) == state_row(state)
    assert encode_row(state_row(state)) == blob


def test_format_2_holds_integer_times_and_no_time_strings() -> None:
    raw = orjson.loads(encode_state(full_state()))

    assert raw[0] == FORMAT == 2
    assert raw[1][:4] == [False, 1772366400123456, 1, "dd:1"]
    assert not [part for part in str(raw).split("'") if "2026-" in part]


@pytest.mark.parametrize("blob", [FORMAT_1_FULL, FORMAT_1_SHORT])
def test_a_format_1_state_is_read_as_it_was_written(blob: bytes) -> None:
    expected = full_state() if blob is FORMAT_1_FULL else KeyState(
        key=KEY, register=domain.Register(opted_in=True, origin_time=T, origin_side="dynamics",
                                   change_id="dyn:2"))

    assert decode_state(KEY, 0, blob) == expected
    assert decode_row(KEY, 0, blob) == state_row(expected)
    # and its next save writes it in format 2
    assert decode_state(KEY, 0, encode_state(decode_state(KEY, 0, blob))) == expected


@pytest.mark.parametrize("blob", [b'[3,null]', b'{}', b'[]'])
def test_an_unknown_format_is_refused_with_the_key_named(blob: bytes) -> None:
    with pytest.raises(ValueError, match="unknown key-state format for acme/7"):
        decode_state(KEY, 0, blob)
    with pytest.raises(ValueError, match="unknown key-state format for acme/7"):
        decode_row(KEY, 0, blob)
