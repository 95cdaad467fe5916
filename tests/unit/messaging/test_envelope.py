from __future__ import annotations

import contextlib
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.messaging.envelope import (
    Envelope,
    MalformedMessage,
    PreferenceChange,
    WriteCommand,
    decode,
    encode,
)

T0 = datetime(2026, 5, 1, 12, 0, 0, 250000, tzinfo=UTC)


def envelope(**overrides: object) -> Envelope:
    base: dict[str, object] = {
        "type": "preference-changes", "account": "acme", "source": "dynamics", "change_id": "c-1",
        "origin_time": T0,
        "changes": (PreferenceChange(email="a@example.com", preference_id=7, opted_in=True,
                                  origin_time=T0, version=42, change_id="r-1"),),
        "run_id": "run-1",
    }
    base.update(overrides)
    return Envelope(**base)  # type: ignore[arg-type]


def test_round_trip() -> None:
    original = envelope()
    assert decode(encode(original)) == original


def test_a_carried_change_round_trips_and_is_read_strictly() -> None:
    change = PreferenceChange(email="a@example.com", preference_id=7, opted_in=False,
                              origin_time=T0, change_id="carry-1", carried=True)
    original = envelope(changes=(change,))
    assert decode(encode(original)) == original
    with pytest.raises(MalformedMessage) as info:
        decode(mutate(["changes", 0, "carried"], "yes"))
    assert "changes[0].carried: must be a boolean" in info.value.reason


def test_a_joined_change_round_trips_and_is_never_also_carried() -> None:
    change = PreferenceChange(email="a@example.com", preference_id=7, opted_in=True,
                              origin_time=T0, change_id="joined-1", joined=True)
    original = envelope(changes=(change,))
    assert decode(encode(original)) == original
    body = orjson.loads(encode(original))
    body["changes"][0]["carried"] = True
    with pytest.raises(MalformedMessage) as info:
        decode(orjson.dumps(body))
    assert "changes[0]: carried and joined at once" in info.value.reason


def test_write_commands_round_trip() -> None:
    command = WriteCommand(email="a@example.com", preference_id=7, side="dotdigital",
                           opted_in=False, origin_time=T0, origin_side="dynamics", change_id="x")
    original = envelope(type="write-commands", source="reconciler", changes=(command,))
    assert decode(encode(original)) == original


def mutate(path: list[str | int], value: object) -> bytes:
    raw = orjson.loads(encode(envelope()))
    target = raw
    for step in path[:-1]:
        target = target[step]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return orjson.dumps(raw)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (mutate(["v"], 2), "unknown schema version 2"),
        (mutate(["v"], KeyError), "unknown schema version None"),
        (mutate(["account"], KeyError), "missing field 'account'"),
        (mutate(["type"], "gossip"), "unknown message type"),
        (mutate(["origin_time"], "yesterday"), "bad timestamp"),
        (mutate(["origin_time"], "2026-05-01T12:00:00"), "no time zone"),
        (mutate(["changes"], []), "changes: empty"),
        (mutate(["changes", 0, "opted_in"], "yes"), "changes[0].opted_in: must be bool"),
        (mutate(["changes", 0, "preference_id"], True), "must be an integer"),
        (mutate(["changes", 0, "email"], "nobody"), "not an email address"),
        (mutate(["changes", 0, "origin_time"], KeyError), "changes[0]: missing field 'origin_time'"),
    ],
)
def test_strict_decoding_names_the_reason(body: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage) as info:
        decode(body)
    assert reason in info.value.reason


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        # passed decoding before, then failed in the handler, taking its batch down with it
        (mutate(["changes", 0, "email"], "a@b@c.com"), "changes[0].email: not an email address"),
        (mutate(["changes", 0, "email"], "a b@c.com"), "changes[0].email: not an email address"),
        (mutate(["changes", 0, "email"], "@c.com"), "changes[0].email: not an email address"),
        # overflowed the ledger's 64-bit columns
        (mutate(["changes", 0, "preference_id"], 2 ** 63),
         "changes[0].preference_id: 9223372036854775808 does not fit in a signed 64-bit integer"),
        (mutate(["changes", 0, "version"], 2 ** 64 - 1),
         "changes[0].version: 18446744073709551615 does not fit"),
        (mutate(["changes", 0, "change_id"], 12), "changes[0].change_id: must be a string"),
    ],
)
def test_what_a_handler_could_not_process_is_refused_at_decode(body: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage) as info:
        decode(body)
    assert reason in info.value.reason


def test_the_64_bit_bounds_themselves_decode() -> None:
    for value in (2 ** 63 - 1, -(2 ** 63)):
        decoded = decode(mutate(["changes", 0, "preference_id"], value))
        assert decoded.changes[0].preference_id == value  # type: ignore[union-attr]


def test_a_write_command_with_a_bad_email_or_id_is_refused() -> None:
    command = WriteCommand(email="a@b@c.com", preference_id=7, side="dotdigital",
                           opted_in=False, origin_time=T0, origin_side="dynamics")
    with pytest.raises(MalformedMessage, match="not an email address"):
        decode(encode(envelope(type="write-commands", source="reconciler",
                                                 changes=(command,))))
    raw = orjson.loads(encode(envelope(type="read-markers", source="dotdigital",
                                                changes=())))
    raw["changes"] = [{"preference_id": 2 ** 63, "origin_time": "2026-05-01T12:00:00Z"}]
    with pytest.raises(MalformedMessage, match="signed 64-bit"):
        decode(orjson.dumps(raw))


@given(st.binary(max_size=200))
def test_garbage_never_escapes_as_another_error(body: bytes) -> None:
    with contextlib.suppress(MalformedMessage):
        decode(body)
