"""The trusted constructors (parts checked once, where they enter) give objects equal to the
validating constructors' for valid parts, and a decision says ``changed`` exactly when the
state differs."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from itertools import repeat

from hypothesis import given
from hypothesis import strategies as st

from common.domain import (
    ContactState,
    HistoryEntry,
    KeyState,
    Observation,
    PreferenceKey,
    Side,
    WriteCommand,
    begin_write,
    in_time_base,
    normalize_email,
    reconcile,
    record_write,
    settle,
)
from common.domain.trusted import assembled_all
from common.messaging.envelope import Envelope, PreferenceChange, decode, encode
from tests.unit.domain.builders import T0, examples

FAST = examples(100)

_word = st.text(alphabet="abcXYZ019._-+", min_size=1, max_size=8)
# valid addresses in any spelling: mixed case, white space around
emails = st.builds(lambda pad, local, domain, end: f"{pad}{local}@{domain}{end}",
                   st.sampled_from(["", " ", "\t"]), _word, _word,
                   st.sampled_from(["", " ", "\n"]))
sides: st.SearchStrategy[Side] = st.sampled_from(["dynamics", "dotdigital"])
# times in any zone (the constructors put them in UTC; trusted callers pass UTC already)
zones = st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5))])
times = st.builds(lambda seconds, zone: (T0 + timedelta(milliseconds=seconds)).astimezone(zone),
                  st.integers(-10**8, 10**8), zones)
versions = st.none() | st.integers(0, 2**63 - 1)
change_ids = st.text(max_size=6)
statuses = st.sampled_from(["Subscribed", "Unsubscribed", "softBounced", "HardBounced"])


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def _refused_by_characters(value: str) -> bool:
    """The address rule spelt out character by character."""
    email = value.strip().lower()
    local, at, domain = email.rpartition("@")
    return (not at or not local or not domain or "@" in local
            or any(c.isspace() for c in email))


@examples(300)
@given(value=emails | st.text(max_size=12) | st.builds(
    lambda a, space, b: f"{a}{space}{b}", emails, st.sampled_from(
        [" ", "\t", "\u00a0", "\u2003", "\u3000", "\x1c", "\u200b", "\u0085"]), emails))
def test_the_email_rule_refuses_white_space_anywhere_inside(value: str) -> None:
    try:
        normalize_email(value)
    except ValueError:
        assert _refused_by_characters(value)
    else:
        assert not _refused_by_characters(value)


@FAST
@given(account=st.text(min_size=1, max_size=5), email=emails,
       preference_id=st.integers(-2**63, 2**63 - 1))
def test_a_trusted_key_equals_the_validated_key(account: str, email: str,
                                                preference_id: int) -> None:
    checked = PreferenceKey(account=account, email=email, preference_id=preference_id)
    trusted = PreferenceKey.trusted(account=account, email=normalize_email(email),
                                    preference_id=preference_id)

    assert trusted == checked
    assert hash(trusted) == hash(checked)
    assert {checked: 1}[trusted] == 1


@FAST
@given(email=emails, side=sides, opted_in=st.booleans(), origin=times, version=versions,
       change_id=change_ids, flag=st.sampled_from(["", "carried", "joined"]))
def test_a_trusted_observation_equals_the_validated_one(
        email: str, side: Side, opted_in: bool, origin: datetime, version: int | None,
        change_id: str, flag: str) -> None:
    key = PreferenceKey(account="acme", email=email, preference_id=7)
    checked = Observation(key=key, side=side, opted_in=opted_in, origin_time=origin,
                          version=version, change_id=change_id, carried=flag == "carried",
                          joined=flag == "joined")
    trusted = Observation.trusted(key=key, side=side, opted_in=opted_in,
                                  origin_time=_utc(origin), version=version,
                                  change_id=change_id, carried=flag == "carried",
                                  joined=flag == "joined")

    assert trusted == checked


@FAST
@given(origin=times, read_at=times, offset_ms=st.integers(-10**6, 10**6),
       uncertainty_ms=st.integers(0, 10**6), bounded=st.none() | times,
       epoch=st.integers(-1, 5))
def test_placing_an_observation_equals_replacing_its_fields(
        origin: datetime, read_at: datetime, offset_ms: int, uncertainty_ms: int,
        bounded: datetime | None, epoch: int) -> None:
    observation = Observation(key=PreferenceKey(account="acme", email="a@b.c", preference_id=1),
                              side="dotdigital", opted_in=True, origin_time=origin)
    parts = {"offset": timedelta(milliseconds=offset_ms),
             "uncertainty": timedelta(milliseconds=uncertainty_ms),
             "bounded_time": None if bounded is None else _utc(bounded), "clock_epoch": epoch}

    assert observation.placed(**parts) == replace(observation, **parts)  # type: ignore[arg-type]
    assert (in_time_base(observation, estimate=None, read_at=read_at)
            == replace(observation, bounded_time=(_utc(read_at) if origin > read_at
                                                  + timedelta(minutes=5) else None)))


def test_placing_refuses_a_negative_uncertainty() -> None:
    observation = Observation(key=PreferenceKey(account="acme", email="a@b.c", preference_id=1),
                              side="dotdigital", opted_in=True, origin_time=T0)
    try:
        observation.placed(offset=timedelta(0), uncertainty=timedelta(seconds=-1),
                           bounded_time=None, clock_epoch=0)
    except ValueError:
        return
    raise AssertionError("a negative uncertainty was accepted")


@FAST
@given(email=emails, side=sides, opted_in=st.booleans(), origin=times, recorded=times,
       corrected=st.none() | times, decision=st.sampled_from(["applied", "written"]))
def test_a_trusted_history_entry_equals_the_validated_one(
        email: str, side: Side, opted_in: bool, origin: datetime, recorded: datetime,
        corrected: datetime | None, decision: str) -> None:
    parts = {"account": "acme", "preference_id": 3, "side": side, "opted_in": opted_in,
             "change_id": "c", "decision": decision}
    checked = HistoryEntry(email=email, origin_time=origin, recorded_at=recorded,
                           corrected_time=corrected, **parts)  # type: ignore[arg-type]
    trusted = HistoryEntry.trusted(
        email=normalize_email(email), origin_time=_utc(origin), recorded_at=_utc(recorded),
        corrected_time=None if corrected is None else _utc(corrected),
        **parts)  # type: ignore[arg-type]

    assert trusted == checked


@FAST
@given(email=emails, side=sides, opted_in=st.booleans(), origin=times, recorded=times,
       offset_ms=st.integers(-10**6, 10**6))
def test_a_history_entry_for_an_observation_equals_the_validated_one(
        email: str, side: Side, opted_in: bool, origin: datetime, recorded: datetime,
        offset_ms: int) -> None:
    key = PreferenceKey(account="acme", email=email, preference_id=3)
    observation = Observation(key=key, side=side, opted_in=opted_in, origin_time=origin,
                              change_id="c", offset=timedelta(milliseconds=offset_ms))

    entry = HistoryEntry.for_observation(observation, decision="applied", recorded_at=recorded)

    assert entry == HistoryEntry(account="acme", email=email, preference_id=3, side=side,
                                 opted_in=opted_in, origin_time=origin, change_id="c",
                                 decision="applied", recorded_at=recorded,
                                 corrected_time=observation.corrected_time)


@FAST
@given(writes=st.lists(st.tuples(emails, sides, st.booleans(), times,
                                 st.sampled_from(["written", "failed", "suppressed",
                                                  "read-only"])), max_size=6),
       recorded=times)
def test_history_entries_for_writes_equal_the_validated_ones(
        writes: list[tuple[str, Side, bool, datetime, str]], recorded: datetime) -> None:
    commands = [(WriteCommand(key=PreferenceKey(account="acme", email=email, preference_id=i),
                              side=side, opted_in=opted_in, origin_time=origin,
                              origin_side="dotdigital", change_id=f"c{i}"), decision)
                for i, (email, side, opted_in, origin, decision) in enumerate(writes)]

    entries = HistoryEntry.for_writes(commands, recorded_at=recorded)

    assert entries == [HistoryEntry(
        account="acme", email=email, preference_id=i, side=side, opted_in=opted_in,
        origin_time=origin, change_id=f"c{i}", decision=decision, recorded_at=recorded)
        for i, (email, side, opted_in, origin, decision) in enumerate(writes)]
    assert entries == [HistoryEntry.for_write(command, recorded_at=recorded, decision=decision)
                       for command, decision in commands]


@FAST
@given(email=emails, status=statuses, since=times, revision=st.integers(0, 10**6))
def test_a_trusted_contact_state_equals_the_validated_one(email: str, status: str,
                                                          since: datetime,
                                                          revision: int) -> None:
    checked = ContactState(account="acme", email=email, status=status, since=since,
                           revision=revision)
    trusted = ContactState.trusted(account="acme", email=normalize_email(email),
                                   status=status, since=_utc(since), revision=revision)

    assert trusted == checked


@dataclass(frozen=True)
class _Unslotted:
    """A frozen dataclass with a ``__dict__`` (no slots): set by name."""

    name: str
    count: int = 0


@FAST
@given(rows=st.lists(st.tuples(emails.map(normalize_email), st.integers(-2**63, 2**63 - 1),
                               st.booleans(), times.map(_utc), change_ids), max_size=6))
def test_changes_assembled_a_column_at_a_time_equal_the_validated_ones(
        rows: list[tuple[str, int, bool, datetime, str]]) -> None:
    emails_, preference_ids, opted_in, origin_times, ids = (
        [row[i] for row in rows] for i in range(5))
    built = assembled_all(PreferenceChange, len(rows), email=emails_,
                          preference_id=preference_ids, opted_in=opted_in,
                          origin_time=origin_times, version=repeat(None), change_id=ids,
                          carried=repeat(False), joined=repeat(False))
    assert built == [PreferenceChange(email=email, preference_id=preference_id,
                                      opted_in=opted, origin_time=origin, change_id=change_id)
                     for email, preference_id, opted, origin, change_id in rows]
    unslotted = assembled_all(_Unslotted, len(rows), name=ids, count=preference_ids)
    assert unslotted == [_Unslotted(name=change_id, count=preference_id)
                         for _, preference_id, _, _, change_id in rows]


@FAST
@given(email=emails)
def test_a_decoded_email_is_normalised_once_for_good(email: str) -> None:
    change = PreferenceChange(email=email, preference_id=7, opted_in=True, origin_time=T0)
    body = encode(Envelope(type="preference-changes", account="acme", source="dynamics",
                           change_id="m", origin_time=T0, changes=(change,)))

    (decoded,) = decode(body).changes

    assert isinstance(decoded, PreferenceChange)
    assert decoded.email == normalize_email(email)
    assert PreferenceKey.trusted(account="acme", email=decoded.email, preference_id=7) == (
        PreferenceKey(account="acme", email=email, preference_id=7))


# one key's changes from both sides, with versions, carried and joined values, and our writes
_steps = st.lists(st.tuples(
    st.sampled_from(["read", "carried", "joined", "begin", "confirm"]), sides, st.booleans(),
    st.integers(0, 40), st.integers(0, 3)), min_size=1, max_size=12)


@examples(200)
@given(steps=_steps)
def test_a_decision_is_changed_exactly_when_the_state_differs(
        steps: list[tuple[str, Side, bool, int, int]]) -> None:
    key = PreferenceKey(account="acme", email="a@b.c", preference_id=1)
    state: KeyState | None = None
    for kind, side, opted_in, second, version in steps:
        when = T0 + timedelta(seconds=second, milliseconds=0 if side == "dynamics" else 250)
        current = state or KeyState(key=key)
        if kind in ("begin", "confirm"):
            for command in settle(current)[1]:
                if kind == "begin":
                    state = begin_write(current, command, window_start=when)
                else:
                    state = record_write(current, command, window_start=when,
                                         window_end=when + timedelta(seconds=1),
                                         produced_version=(100 + version
                                                           if command.side == "dynamics"
                                                           else None), written_at=when)
            continue
        observation = Observation(
            key=key, side=side, opted_in=opted_in, origin_time=when,
            version=100 + version if side == "dynamics" else None,
            carried=kind == "carried", joined=kind == "joined")
        decision = reconcile(state, observation)
        assert decision.changed == (decision.state != current)
        settled, commands = settle(decision.state)
        assert settled == decision.state and commands == decision.commands
        state = decision.state
