"""The envelope's codec: what each schema version carries, that version 1 (still read) and
version 2 (published, in columns) decode to the same changes, and that both refuse what a
handler could not process with a reason naming the faulty field."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.messaging.abc import Outgoing
from common.messaging.envelope import (
    FLOAT_EXACT_MS,
    SCHEMA_VERSION,
    Change,
    ContactStatusChange,
    EligibleContact,
    Envelope,
    MalformedMessage,
    PreferenceChange,
    ReadComplete,
    WriteCommand,
    decode,
    encode,
    epoch_ms,
    epoch_ms_column,
    exact_time,
)
from common.messaging.publishing import (
    CHUNK,
    POLLED_AT,
    column_envelopes_by_shard,
    envelopes_by_shard,
)
from services.cli.replay import refeed

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


VERSIONS = pytest.mark.parametrize("version", [1, 2])


def test_the_services_publish_version_2() -> None:
    assert SCHEMA_VERSION == 2
    assert orjson.loads(encode(envelope()))["v"] == 2


@VERSIONS
def test_round_trip(version: int) -> None:
    original = envelope(version=version)
    assert decode(encode(original)) == original


@VERSIONS
def test_a_carried_change_round_trips_and_is_read_strictly(version: int) -> None:
    change = PreferenceChange(email="a@example.com", preference_id=7, opted_in=False,
                              origin_time=T0, change_id="carry-1", carried=True)
    original = envelope(changes=(change,), version=version)
    assert decode(encode(original)) == original
    with pytest.raises(MalformedMessage) as info:
        decode(mutate(["changes", 0, "carried"], "yes"))
    assert "changes[0].carried: must be a boolean" in info.value.reason
    with pytest.raises(MalformedMessage) as info:
        decode(mutate(["changes", "carried"], ["yes"], version=2))
    assert "changes[0].carried: must be a boolean, got str" in info.value.reason


@VERSIONS
def test_a_joined_change_round_trips_and_is_never_also_carried(version: int) -> None:
    change = PreferenceChange(email="a@example.com", preference_id=7, opted_in=True,
                              origin_time=T0, change_id="joined-1", joined=True)
    original = envelope(changes=(change,), version=version)
    assert decode(encode(original)) == original
    body = orjson.loads(encode(original))
    if version == 1:
        body["changes"][0]["carried"] = True
    else:
        body["changes"]["carried"] = [True]
    with pytest.raises(MalformedMessage) as info:
        decode(orjson.dumps(body))
    assert "changes[0]: carried and joined at once" in info.value.reason


@VERSIONS
def test_write_commands_round_trip(version: int) -> None:
    command = WriteCommand(email="a@example.com", preference_id=7, side="dotdigital",
                           opted_in=False, origin_time=T0, origin_side="dynamics", change_id="x")
    original = envelope(type="write-commands", source="reconciler", changes=(command,),
                        version=version)
    assert decode(encode(original)) == original


def mutate(path: list[str | int], value: object, *, version: int = 1) -> bytes:
    """A message of :func:`envelope` in ``version``, with the value at ``path`` replaced
    (``KeyError``: removed)."""
    raw = orjson.loads(encode(envelope(version=version)))
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
        (mutate(["v"], 3), "unknown schema version 3"),
        (mutate(["v"], True), "unknown schema version True"),
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
        for body in (mutate(["changes", 0, "preference_id"], value),
                     mutate(["changes", "preference_id"], [value], version=2)):
            decoded = decode(body)
            assert decoded.changes[0].preference_id == value  # type: ignore[union-attr]


@VERSIONS
def test_a_write_command_with_a_bad_email_or_id_is_refused(version: int) -> None:
    command = WriteCommand(email="a@b@c.com", preference_id=7, side="dotdigital",
                           opted_in=False, origin_time=T0, origin_side="dynamics")
    with pytest.raises(MalformedMessage, match="not an email address"):
        decode(encode(envelope(type="write-commands", source="reconciler",
                               changes=(command,), version=version)))
    raw = orjson.loads(encode(envelope(type="read-markers", source="dotdigital",
                                       changes=(), version=version)))
    if version == 1:
        raw["changes"] = [{"preference_id": 2 ** 63, "origin_time": "2026-05-01T12:00:00Z"}]
    else:
        raw["changes"] = {"preference_id": [2 ** 63], "origin_time": [epoch_ms(T0)]}
    with pytest.raises(MalformedMessage, match="signed 64-bit"):
        decode(orjson.dumps(raw))


def columns(**changed: object) -> bytes:
    """A version 2 message of :func:`envelope` with ``changes`` columns replaced (``KeyError``:
    removed)."""
    raw = orjson.loads(encode(envelope(version=2)))
    for name, value in changed.items():
        if value is KeyError:
            del raw["changes"][name]
        else:
            raw["changes"][name] = value
    return orjson.dumps(raw)


def three() -> bytes:
    """A version 2 message of three preference changes (faults put in the second)."""
    changes = tuple(PreferenceChange(email=f"p{i}@example.com", preference_id=7, opted_in=True,
                                     origin_time=T0, version=i, change_id=f"r-{i}")
                    for i in range(3))
    return encode(envelope(changes=changes, version=2))


def three_with(*edits: tuple[str, int, object]) -> bytes:
    """:func:`three` with each (column, index, value) of ``edits`` set."""
    raw = orjson.loads(three())
    for name, index, value in edits:
        raw["changes"][name][index] = value
    return orjson.dumps(raw)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        # the envelope
        (mutate(["origin_time"], "2026-05-01T12:00:00Z", version=2),
         "envelope.origin_time: must be int, got str"),
        (mutate(["origin_time"], 10 ** 15, version=2), "envelope.origin_time: 1000000000000000 "
         "is not a time"),
        (mutate(["changes"], [{"email": "a@example.com"}], version=2),
         "envelope.changes: must be dict, got list"),
        (columns(email=[], preference_id=[], opted_in=[], origin_time=[], version=[],
                 change_id=[]), "changes: empty"),
        # the columns themselves
        (columns(email=KeyError), "changes: missing column 'email'"),
        (columns(origin_time=KeyError), "changes: missing column 'origin_time'"),
        (columns(colour=["red"]), "changes: unknown column(s) 'colour'"),
        (columns(opted_in=True), "changes.opted_in: must be an array (a column), got bool"),
        (columns(email="a@example.com"), "changes.email: must be an array (a column), got str"),
        (columns(opted_in=[True, False]),
         "changes: ragged columns: 'email' has 1 values, 'opted_in' has 2"),
        (columns(change_id=[]), "changes: ragged columns: 'email' has 1 values, 'change_id' has 0"),
        # a value of a column
        (columns(opted_in=["yes"]), "changes[0].opted_in: must be a boolean, got str"),
        (columns(opted_in=[1]), "changes[0].opted_in: must be a boolean, got int"),
        (columns(preference_id=[True]), "changes[0].preference_id: must be an integer, got bool"),
        (columns(preference_id=[7.0]), "changes[0].preference_id: must be an integer, got float"),
        (columns(preference_id=[2 ** 63]),
         "changes[0].preference_id: 9223372036854775808 does not fit in a signed 64-bit integer"),
        (columns(version=[2 ** 64 - 1]), "changes[0].version: 18446744073709551615 does not fit"),
        (columns(version=["42"]), "changes[0].version: must be an integer or null, got str"),
        (columns(change_id=[12]), "changes[0].change_id: must be a string, got int"),
        (columns(email=["nobody"]), "changes[0].email: not an email address"),
        (columns(email=["a@b@c.com"]), "changes[0].email: not an email address"),
        (columns(email=["a b@c.com"]), "changes[0].email: not an email address"),
        (columns(email=["@c.com"]), "changes[0].email: not an email address"),
        (columns(email=[None]), "changes[0].email: must be a string, got NoneType"),
        # a bad time
        (columns(origin_time=["2026-05-01T12:00:00Z"]),
         "changes[0].origin_time: must be an integer (epoch milliseconds), got str"),
        (columns(origin_time=[1.5e12]),
         "changes[0].origin_time: must be an integer (epoch milliseconds), got float"),
        (columns(origin_time=[10 ** 15]), "changes[0].origin_time: 1000000000000000 is not a time"),
        (columns(origin_time=[-(10 ** 15)]), "is not a time (epoch milliseconds within the years"),
        # the first faulty value is named, wherever it is
        (three_with(("email", 1, "nobody")), "changes[1].email: not an email address"),
        (three_with(("origin_time", 1, "noon")), "changes[1].origin_time: must be an integer"),
        (three_with(("version", 2, 2 ** 63)), "changes[2].version: 9223372036854775808 does not fit"),
        (three_with(("version", 0, None), ("version", 2, 2 ** 63)),
         "changes[2].version: 9223372036854775808 does not fit"),
    ],
)
def test_a_faulty_column_is_refused_with_its_reason(body: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage) as info:
        decode(body)
    assert reason in info.value.reason


def test_the_change_both_carried_and_joined_is_named() -> None:
    raw = orjson.loads(three())
    raw["changes"].update(carried=[True, False, True], joined=[False, True, True])
    with pytest.raises(MalformedMessage) as info:
        decode(orjson.dumps(raw))
    assert info.value.reason == "changes[2]: carried and joined at once"


@pytest.mark.parametrize(
    ("kind", "column", "value", "reason"),
    [
        ("write-commands", "side", "moon", "changes[0].side: 'moon' is not one of"),
        ("write-commands", "origin_side", 3, "changes[0].origin_side: must be a string, got int"),
        ("write-commands", "covered", "no", "changes[0].covered: must be a boolean"),
        ("contact-status-changes", "status", "", "changes[0].status: must not be empty"),
        ("read-markers", "origin_time", None, "changes[0].origin_time: must be an integer"),
        ("sync-trigger", "email", "nobody", "changes[0].email: not an email address"),
    ],
)
def test_each_change_type_checks_its_columns(kind: str, column: str, value: object,
                                             reason: str) -> None:
    raw = orjson.loads(encode(one_of_each()[kind]))
    raw["changes"][column] = [value]
    with pytest.raises(MalformedMessage) as info:
        decode(orjson.dumps(raw))
    assert reason in info.value.reason


def one_of_each() -> dict[str, Envelope]:
    """A version 2 message of each type, every optional field set."""
    by_type: dict[str, tuple[str, Change]] = {
        "preference-changes": ("dynamics", PreferenceChange(
            email="a@example.com", preference_id=7, opted_in=True, origin_time=T0, version=3,
            change_id="r-1", carried=True)),
        "contact-status-changes": ("dotdigital", ContactStatusChange(
            email="a@example.com", status="Suppressed", origin_time=T0, change_id="s-1")),
        "write-commands": ("reconciler", WriteCommand(
            email="a@example.com", preference_id=7, side="dotdigital", opted_in=False,
            origin_time=T0, origin_side="dynamics", change_id="x", covered=True)),
        "read-markers": ("dotdigital", ReadComplete(preference_id=7, origin_time=T0)),
        "sync-trigger": ("control", EligibleContact(email="a@example.com")),
    }
    return {kind: envelope(type=kind, source=source, changes=(change,), version=2)
            for kind, (source, change) in by_type.items()}


def test_every_change_type_round_trips_in_columns() -> None:
    for original in one_of_each().values():
        body = encode(original)
        assert isinstance(orjson.loads(body)["changes"], dict)
        assert decode(body) == original


def test_a_sync_trigger_may_name_no_email() -> None:
    original = envelope(type="sync-trigger", source="control", changes=(), version=2)
    assert decode(encode(original)) == original


def test_columns_of_defaults_only_are_left_out_and_read_as_their_defaults() -> None:
    change = PreferenceChange(email="a@example.com", preference_id=7, opted_in=True,
                              origin_time=T0)
    raw = orjson.loads(encode(envelope(changes=(change,), version=2)))
    assert sorted(raw["changes"]) == ["email", "opted_in", "origin_time", "preference_id"]
    # written out in full, they read the same
    raw["changes"].update(version=[None], change_id=[""], carried=[False], joined=[False])
    assert decode(orjson.dumps(raw)).changes == (change,)


def test_times_travel_as_epoch_milliseconds_truncated_as_in_version_1() -> None:
    at = datetime(2026, 5, 1, 12, 0, 0, 250999, tzinfo=UTC)
    change = PreferenceChange(email="a@example.com", preference_id=7, opted_in=True,
                              origin_time=at)
    raw = orjson.loads(encode(envelope(changes=(change,), origin_time=at, version=2)))
    assert raw["origin_time"] == raw["changes"]["origin_time"][0] == 1777636800250
    by_version = [decode(encode(envelope(changes=(change,), origin_time=at, version=v)))
                  for v in (1, 2)]
    assert by_version[0] == replace(by_version[1], version=1)
    assert by_version[1].changes[0].origin_time == at.replace(microsecond=250000)  # type: ignore[union-attr]
    assert by_version[1].origin_time.tzinfo is UTC


@given(st.integers(min_value=-FLOAT_EXACT_MS + 1, max_value=FLOAT_EXACT_MS - 1)
       | st.sampled_from([-FLOAT_EXACT_MS + 1, -1, 0, 1, 999, 1000, FLOAT_EXACT_MS - 1]))
def test_a_time_read_through_a_float_is_the_exact_time(ms: int) -> None:
    decoded = decode(columns(origin_time=[ms]))
    assert decoded.changes[0].origin_time == exact_time(ms)  # type: ignore[union-attr]
    assert epoch_ms(exact_time(ms)) == ms


@pytest.mark.parametrize("ms", [-FLOAT_EXACT_MS, FLOAT_EXACT_MS, 253402300799999,
                                -62135596800000])
def test_a_time_far_from_the_epoch_is_exact_too(ms: int) -> None:
    decoded = decode(three_with(("origin_time", 1, ms)))
    assert decoded.changes[1].origin_time == exact_time(ms)  # type: ignore[union-attr]
    assert epoch_ms(decoded.changes[1].origin_time) == ms  # type: ignore[union-attr]


def test_emails_come_out_normalised_each_change_its_own() -> None:
    changes = tuple(PreferenceChange(email=email, preference_id=p, opted_in=True,
                                     origin_time=T0)
                    for email, p in (("Ann@Example.com ", 1), ("ann@example.com", 2),
                                     ("Ann@Example.com ", 3), ("bob@example.com", 1)))
    decoded = decode(encode(envelope(changes=changes, version=2)))
    assert [(c.email, c.preference_id) for c in decoded.changes] == [  # type: ignore[union-attr]
        ("ann@example.com", 1), ("ann@example.com", 2), ("ann@example.com", 3),
        ("bob@example.com", 1)]


def test_a_message_of_one_type_carries_changes_of_that_type_only() -> None:
    mixed = envelope(changes=(envelope().changes[0], EligibleContact(email="a@example.com")),
                     version=2)
    with pytest.raises(ValueError, match="PreferenceChange changes only"):
        encode(mixed)


def test_a_naive_time_is_never_encoded() -> None:
    with pytest.raises(ValueError, match="naive datetime"):
        encode(envelope(origin_time=T0.replace(tzinfo=None)))


emails = st.sampled_from(["a@example.com", "B@Example.com", "c@example.org", " d@x.io"])
int64s = st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1)
times = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                     timezones=st.just(UTC))


@st.composite
def preference_changes(draw: st.DrawFn) -> PreferenceChange:
    carried = draw(st.booleans())
    return PreferenceChange(
        email=draw(emails), preference_id=draw(int64s), opted_in=draw(st.booleans()),
        origin_time=draw(times), version=draw(st.none() | int64s),
        change_id=draw(st.text(max_size=5)), carried=carried,
        joined=not carried and draw(st.booleans()))


def _same_messages(built: list[Outgoing], expected: list[Outgoing]) -> None:
    """The same messages but for the time they were made (``POLLED_AT``)."""
    assert [replace(o, headers={}) for o in built] == [replace(o, headers={}) for o in expected]
    assert all(o.headers.keys() == {POLLED_AT} for o in built)


_FIELDS = {"preference-changes": ("email", "preference_id", "opted_in", "origin_time", "version",
                                  "change_id", "carried", "joined"),
           "contact-status-changes": ("email", "status", "origin_time", "change_id")}


def _columns_of(changes: Sequence[Change], kind: str) -> dict[str, list[Any]]:
    return {name: [getattr(c, name) for c in changes] for name in _FIELDS[kind]}


@given(st.lists(preference_changes(), min_size=1, max_size=8), st.integers(1, 5),
       st.booleans())
def test_changes_published_from_columns_make_the_messages_the_changes_make(
        changes: list[PreferenceChange], shards: int, some_columns_left_out: bool) -> None:
    columns = _columns_of(changes, "preference-changes")
    if some_columns_left_out:
        # left out: the default for every change
        changes = [replace(c, version=None, carried=False, joined=False) for c in changes]
        columns = {k: v for k, v in columns.items() if k not in ("version", "carried", "joined")}
    for kind, made, of in (("preference-changes", changes, columns), (
            "contact-status-changes",
            [ContactStatusChange(email=c.email, status="Suppressed", origin_time=c.origin_time,
                                 change_id=c.change_id) for c in changes], None)):
        of = of or _columns_of(made, kind)
        _same_messages(
            column_envelopes_by_shard(account="acme", source="dotdigital", type=kind,  # type: ignore[arg-type]
                                      columns=of, shards=shards, run_id="r", id_seed="s"),
            envelopes_by_shard(account="acme", source="dotdigital", type=kind,  # type: ignore[arg-type]
                               changes=made, shards=shards, run_id="r", id_seed="s"))


def test_a_page_of_changes_from_columns_is_chunked_as_the_changes_are() -> None:
    changes = [PreferenceChange(email=f"p{i}@example.com", preference_id=7, opted_in=i % 2 == 0,
                                origin_time=T0 + timedelta(milliseconds=i * 37),
                                change_id=f"ec:{i}")
               for i in range(2 * CHUNK + 7)]
    built = column_envelopes_by_shard(
        account="acme", source="dotdigital", type="preference-changes", shards=2, run_id=None,
        id_seed="page", columns={k: v for k, v in _columns_of(changes, "preference-changes").items()
                                 if k not in ("version", "carried", "joined")})
    _same_messages(built, envelopes_by_shard(
        account="acme", source="dotdigital", type="preference-changes", changes=changes,
        shards=2, run_id=None, id_seed="page"))
    decoded = [c for o in built for c in decode(o.body).changes]
    assert len(built) > 2 and sorted(decoded, key=repr) == sorted(changes, key=repr)


@given(st.lists(preference_changes(), min_size=1, max_size=8))
def test_a_version_1_message_decodes_to_the_changes_version_2_carries(
        changes: list[PreferenceChange]) -> None:
    original = envelope(changes=tuple(changes))
    old, new = (decode(encode(replace(original, version=v))) for v in (1, 2))
    assert old.changes == new.changes
    assert (old.version, new.version) == (1, 2)
    assert replace(old, version=2) == new


@VERSIONS
def test_replay_reads_either_version_and_feeds_version_2(version: int) -> None:
    changes = tuple(PreferenceChange(email=f"p{i}@example.com", preference_id=7 + i % 2,
                                     opted_in=i % 3 != 0, origin_time=T0 + timedelta(seconds=i),
                                     version=i, change_id=f"r-{i}")
                    for i in range(20))
    logged = encode(envelope(changes=changes, version=version))
    fed = refeed(decode(logged), original_id="m-1", run_id="replay-1", shards=4)
    assert {orjson.loads(o.body)["v"] for o in fed} == {2}
    refed = [c for o in fed for c in decode(o.body).changes]
    assert sorted(refed, key=lambda c: c.change_id) == sorted(  # type: ignore[union-attr]
        changes, key=lambda c: c.change_id)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 63), max_value=2 ** 64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=10)


@given(st.dictionaries(st.sampled_from(["email", "preference_id", "opted_in", "origin_time",
                                        "version", "change_id", "carried", "joined", "x"]),
                       st.lists(json_values, max_size=3) | json_values))
def test_garbage_columns_never_escape_as_another_error(changed: dict[str, object]) -> None:
    with contextlib.suppress(MalformedMessage):
        decode(columns(**changed))


@given(st.binary(max_size=200))
def test_garbage_never_escapes_as_another_error(body: bytes) -> None:
    with contextlib.suppress(MalformedMessage):
        decode(body)


@given(offsets=st.lists(st.integers(-10**12, 10**12), max_size=50),
       repeats=st.lists(st.integers(1, 3), max_size=50))
def test_a_time_column_is_each_times_epoch_ms_however_its_objects_repeat(
        offsets: list[int], repeats: list[int]) -> None:
    # a run of one object (a feed page's times alike), equal objects, and different ones
    moments = [T0 + timedelta(microseconds=o) for o in offsets]
    column = [m for m, n in zip(moments, repeats + [1] * len(moments), strict=False)
              for _ in range(n)]
    column += [exact_time(epoch_ms(m)) for m in moments]  # other objects, alike or not
    assert epoch_ms_column(column) == [epoch_ms(m) for m in column]


def test_a_time_column_refuses_a_naive_time() -> None:
    with pytest.raises(ValueError, match="naive"):
        epoch_ms_column([T0, T0, T0.replace(tzinfo=None)])
