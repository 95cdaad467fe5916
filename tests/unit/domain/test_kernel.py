"""The batch fold kernel (:mod:`common.domain.kernel`) folds rows as ``fold_batch`` folds the
dataclasses: on random stored states and histories, its results converted back are the same
states, changed keys, outcomes, history, parked observations, futures and commands.

The histories are drawn partly from the stored states, so that the rare cases of random times
occur in most examples: echoes of the state's write records (by version or inside their
window, in flight or confirmed), changes stamped by the register's own clock epoch, what a side
is known to hold read again, and observations delivered twice."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import product
from typing import Any

from hypothesis import event, given
from hypothesis import strategies as st

from common.domain import (
    SIDES,
    ContactState,
    Observation,
    Outcome,
    PerSide,
    PreferenceKey,
    Side,
    WriteCommand,
    fold_batch,
    outstanding,
)
from common.domain.clock import UNKNOWN_EPOCH, ZERO
from common.domain.fold import Fold
from common.domain.kernel import RowFold, fold_rows
from common.domain.reconcile import ask_if_decided
from common.domain.rows import (
    OUTCOMES,
    KeyTuple,
    history_entry,
    key_of,
    key_state,
    key_tuple,
    observation_of_row,
    observation_row,
    state_row,
    write_command,
)
from common.domain.state import KeyState, Known, LedgerHorizon, PendingWrite, Register, WriteRecord
from common.domain.writes import IN_FLIGHT_LIMIT, MAX_WRITE_RECORDS
from tests.unit.domain.builders import T0, at, examples

KEYS = [PreferenceKey(account="acme", email="ann@example.com", preference_id=1),
        PreferenceKey(account="acme", email="ann@example.com", preference_id=2),
        PreferenceKey(account="acme", email="bob@example.com", preference_id=1)]
EMAILS = sorted({k.email for k in KEYS})

# Each draw costs tens of microseconds and thousands of examples must run in seconds: parts
# that vary together are drawn at once, as one of their combinations.
BOOLS = (False, True)
# Times: a few seconds (same-second ties), some past the in-flight limit (expired records);
# sub-second parts on both sides of dotdigital's millisecond and Dataverse's second.
MOMENTS = [T0 + timedelta(seconds=seconds, microseconds=micros)
           for seconds in (0, 1, 2, 3, 4, 5, 6, 605, 1300)
           for micros in (0, 1, 999, 1000, 250_000, 999_999)]
OFFSETS = [ZERO, timedelta(milliseconds=300), timedelta(seconds=-2),
           timedelta(microseconds=1_500_001), timedelta(seconds=1)]
UNCERTAINTIES = [ZERO, timedelta(milliseconds=1), timedelta(milliseconds=600), timedelta(seconds=2)]
VERSIONS: list[int | None] = [None, None, None, 1, 2, 3, 4, 5, 6]
CHANGE_IDS = ["c1", "c2", "c3"]
# The register times write records are for: a few, so that one write has several records.
WRITTEN_REGISTERS = [T0, T0 + timedelta(seconds=1, milliseconds=250), T0 + timedelta(seconds=605)]
WINDOWS: list[timedelta | None] = [None, ZERO, timedelta(milliseconds=400), timedelta(seconds=2)]

moments = st.sampled_from(MOMENTS)
# a time beyond the future bound stood in for (bounded_time, Known.stamp), a quarter of the time
maybe_moments: st.SearchStrategy[datetime | None] = st.sampled_from(
    [None] * (3 * len(MOMENTS)) + MOMENTS)
versions = st.sampled_from(VERSIONS)
sides: st.SearchStrategy[Side] = st.sampled_from(SIDES)
# an observation's place in our time base: offset, uncertainty, clock epoch
placements = st.sampled_from(list(product(OFFSETS, UNCERTAINTIES, [0, 1, UNKNOWN_EPOCH])))
pendings = st.sampled_from([PendingWrite(opted_in=opted_in, origin_time=moment)
                            for opted_in, moment in product(BOOLS, MOMENTS)])
horizons = st.sampled_from([LedgerHorizon(until=moment, version=version)
                            for moment, version in product(MOMENTS, VERSIONS)])


register_values = st.sampled_from(list(product(BOOLS, SIDES, CHANGE_IDS)))
known_values = st.sampled_from(list(product(BOOLS, VERSIONS, OFFSETS)))


@st.composite
def registers(draw: st.DrawFn) -> Register:
    opted_in, side, change_id = draw(register_values)
    offset, uncertainty, epoch = draw(placements)
    return Register(opted_in=opted_in, origin_time=draw(moments), origin_side=side,
                    change_id=change_id, offset=offset, uncertainty=uncertainty,
                    bounded_time=draw(maybe_moments), clock_epoch=epoch)


@st.composite
def knowns(draw: st.DrawFn) -> Known:
    opted_in, version, offset = draw(known_values)
    return Known(opted_in=opted_in, as_of=draw(moments), version=version,
                 stamp=draw(maybe_moments), offset=offset)


def _write_records(side: Side) -> list[WriteRecord]:
    """Every write record of ``side`` the examples use (Dataverse's with a row version)."""
    return [WriteRecord(side=side, opted_in=opted_in, register_origin_time=written,
                        window_start=start, window_end=None if length is None else start + length,
                        produced_version=version if side == "dynamics" else None,
                        written_at=None if length is None else start + length)
            for opted_in, written, length, start, version in product(
                BOOLS, WRITTEN_REGISTERS, WINDOWS, MOMENTS,
                VERSIONS if side == "dynamics" else [None])]


write_records = {side: st.sampled_from(_write_records(side)) for side in SIDES}


# Strategies are built once: building one per draw costs more than the draw.
maybe_registers = st.none() | registers()
maybe_knowns = st.none() | knowns()
maybe_pendings = st.none() | pendings
record_lists = {side: st.lists(write_records[side], max_size=MAX_WRITE_RECORDS + 1)
                for side in SIDES}
maybe_horizons = st.none() | horizons
revisions = st.integers(0, 3)


@st.composite
def key_states(draw: st.DrawFn, key: PreferenceKey) -> KeyState:
    return KeyState(
        key=key, register=draw(maybe_registers),
        known=PerSide(draw(maybe_knowns), draw(maybe_knowns)),
        pending=PerSide(draw(maybe_pendings), draw(maybe_pendings)),
        writes=PerSide(*(tuple(draw(record_lists[side])) for side in SIDES)),
        horizon=PerSide(draw(maybe_horizons), draw(maybe_horizons)),
        revision=draw(revisions))


# Gaps from a record's window start or a register's stamp: either side of a floor, of a second
# and of the in-flight limit.
GAPS = [timedelta(seconds=-1), timedelta(microseconds=-1), ZERO, timedelta(microseconds=1),
        timedelta(milliseconds=500), timedelta(seconds=1), timedelta(seconds=2), IN_FLIGHT_LIMIT,
        IN_FLIGHT_LIMIT + timedelta(microseconds=1)]
gaps = st.sampled_from(GAPS)
near = st.sampled_from(GAPS[:6])  # within a second or so
# how an observation was made, and its change id
reads = st.sampled_from(list(product(["read"] * 4 + ["carried", "joined"], CHANGE_IDS)))
observation_kinds = st.sampled_from(["random", "random", "echo", "same clock", "read again",
                         "delivered twice"])
batch_sizes = st.integers(0, 10)
booleans = st.booleans()
stored_keys = st.lists(st.sampled_from(KEYS), min_size=1, unique=True)
contacted = st.lists(st.sampled_from(EMAILS), unique=True)
statuses = st.sampled_from(["Subscribed", "Subscribed", "Unsubscribed"])
RECORDED = T0 + timedelta(hours=1)


@dataclass(frozen=True, kw_only=True)
class Batch:
    """Stored states, a batch of observations and the emails' contact states; ``kinds`` the
    kinds of observation drawn (reported with ``--hypothesis-show-statistics``)."""

    states: dict[PreferenceKey, KeyState]
    observations: list[Observation]
    contacts: dict[str, ContactState]
    kinds: frozenset[str]
    # the observations a fold already decided (rule 3 of common.domain.reconcile)
    decided: frozenset[Observation] = frozenset()


def _observation(draw: st.DrawFn, *, key: PreferenceKey, side: Side, opted_in: bool,
                 origin_time: datetime, version: int | None, clock_epoch: int | None = None,
                 bounded_time: datetime | None = None) -> Observation:
    """An observation of the parts given, the others drawn."""
    how, change_id = draw(reads)
    offset, uncertainty, epoch = draw(placements)
    return Observation(key=key, side=side, opted_in=opted_in, origin_time=origin_time,
                       version=version, change_id=change_id, carried=how == "carried",
                       joined=how == "joined", offset=offset, uncertainty=uncertainty,
                       bounded_time=draw(maybe_moments) if bounded_time is None else bounded_time,
                       clock_epoch=epoch if clock_epoch is None else clock_epoch)


def _drawn_from_state(draw: st.DrawFn, kind: str, state: KeyState) -> Observation | None:
    """An observation that meets ``state`` where the rules are subtle (``kind``), or ``None``
    when the state has nothing for it."""
    key, register = state.key, state.register
    records = [*state.writes.dynamics, *state.writes.dotdigital]
    if kind == "echo" and records:
        record = draw(st.sampled_from(records))
        by_version = record.produced_version is not None and draw(booleans)
        return _observation(
            draw, key=key, side=record.side, opted_in=record.opted_in,
            origin_time=draw(moments) if by_version else record.window_start + draw(gaps),
            version=record.produced_version if by_version else draw(versions))
    if kind == "same clock" and register is not None:
        return _observation(draw, key=key, side=register.origin_side, opted_in=draw(booleans),
                            origin_time=register.vendor_time + draw(near),
                            version=draw(versions), clock_epoch=register.clock_epoch)
    held = [(side, k) for side in SIDES if (k := state.known.get(side)) is not None]
    if kind == "read again" and held:
        side, known = draw(st.sampled_from(held))
        return _observation(draw, key=key, side=side, opted_in=known.opted_in,
                            origin_time=known.stamp or known.as_of, version=known.version,
                            bounded_time=known.as_of if known.stamp is not None else None)
    return None


@st.composite
def batches(draw: st.DrawFn) -> Batch:
    stored = draw(stored_keys)
    states = {key: draw(key_states(key)) for key in stored}
    observations: list[Observation] = []
    kinds: set[str] = set()
    for _ in range(draw(batch_sizes)):
        kind = draw(observation_kinds)
        # the kinds drawn from a state meet a stored one
        key = draw(st.sampled_from(KEYS if kind == "random" else stored))
        if kind == "delivered twice" and observations:
            observation: Observation | None = draw(st.sampled_from(observations))
        else:
            observation = _drawn_from_state(draw, kind, states.get(key) or KeyState(key=key))
        if observation is None:
            kind = "random"
            side = draw(sides)
            observation = _observation(draw, key=key, side=side, opted_in=draw(booleans),
                                       origin_time=draw(moments), version=draw(versions))
        kinds.add(kind)
        observations.append(observation)
    contacts = {email: ContactState(account="acme", email=email, status=draw(statuses), since=T0)
                for email in draw(contacted)}
    # any observation may be one a fold already decided, as the ledger says
    decided = frozenset(o for o in observations if draw(booleans))
    return Batch(states=states, observations=observations, contacts=contacts,
                 kinds=frozenset(kinds), decided=decided)


def _folded_both(batch: Batch) -> tuple[Fold, RowFold[KeyTuple]]:
    """``fold_batch`` and the kernel on ``batch``, having checked that they agree."""
    fold = fold_batch(batch.states, batch.observations, contacts=batch.contacts,
                      recorded_at=RECORDED, decided=batch.decided)
    rows = fold_rows({key_tuple(k): state_row(s) for k, s in batch.states.items()},
                     [observation_row(o) for o in batch.observations],
                     suppressed={e for e, c in batch.contacts.items() if c.suppressed},
                     decided={observation_row(o) for o in batch.decided})
    assert {key_of(k): key_state(key_of(k), s) for k, s in rows.states.items()} == fold.states
    assert {key_of(k) for k in rows.changed} == fold.changed
    assert [OUTCOMES[code] for code in rows.outcomes] == fold.outcomes
    assert [history_entry(h, recorded_at=RECORDED) for h in rows.history] == fold.history
    assert rows.parked == [observation_row(o) for o in fold.parked]
    assert [SIDES[side] for side in rows.futures] == fold.futures
    assert {key_of(k) for k in rows.commands} >= fold.changed
    for k, commands in rows.commands.items():
        key = key_of(k)
        assert tuple(write_command(key, c) for c in commands) == outstanding(
            fold.states.get(key) or KeyState(key=key))
    return fold, rows


@examples(3000)
@given(batch=batches())
def test_the_kernel_folds_a_batch_as_fold_batch_does(batch: Batch) -> None:
    fold, _ = _folded_both(batch)
    # what the examples reached (--hypothesis-show-statistics): every outcome, in thousands
    for kind in batch.kinds:
        event(f"drawn: {kind}")
    for outcome in set(fold.outcomes):
        event(f"outcome: {outcome}")
    for key, state in fold.changed_states().items():
        before = batch.states.get(key) or KeyState(key=key)
        if state.horizon != before.horizon:
            event("pruned: the horizon widened")


@examples(300)
@given(state=key_states(KEYS[0]))
def test_a_state_converted_to_a_row_and_back_is_the_same(state: KeyState) -> None:
    assert key_state(state.key, state_row(state)) == state


# -- the subtle rules, one example each (each checked against fold_batch as well) -------------

KEY = KEYS[0]


def _one_key(state: KeyState, *observations: Observation,
             decided: frozenset[Observation] = frozenset()) -> tuple[KeyState, list[Outcome]]:
    """The key's state and the outcomes after folding ``observations`` into ``state``, by both
    (those in ``decided`` already decided by a fold)."""
    fold, _ = _folded_both(Batch(states={KEY: state}, observations=list(observations),
                                 contacts={}, kinds=frozenset(), decided=decided))
    return fold.states[KEY], fold.outcomes


def _seen(side: Side, opted_in: bool, seconds: float, *, offset: timedelta = ZERO,
          uncertainty: timedelta = ZERO, clock_epoch: int = 0) -> Observation:
    return Observation(key=KEY, side=side, opted_in=opted_in, origin_time=at(seconds),
                       change_id=f"{side}:{seconds}", offset=offset, uncertainty=uncertainty,
                       clock_epoch=clock_epoch)


def _register(side: Side, opted_in: bool, seconds: float, *, uncertainty: timedelta = ZERO,
              clock_epoch: int = 0) -> Register:
    return Register.of(_seen(side, opted_in, seconds, uncertainty=uncertainty,
                             clock_epoch=clock_epoch))


def _record(side: Side, opted_in: bool, start: float, end: float | None) -> WriteRecord:
    return WriteRecord(side=side, opted_in=opted_in, register_origin_time=at(start - 5),
                       window_start=at(start), window_end=None if end is None else at(end))


def test_in_a_write_in_flight_an_opt_in_is_our_echo_and_an_opt_out_a_user_change() -> None:
    for opted_in, outcome in ((True, Outcome.ECHO), (False, Outcome.APPLIED)):
        state = KeyState(key=KEY, register=_register("dotdigital", opted_in, 0)).with_writes(
            "dynamics", (_record("dynamics", opted_in, 5, None),))
        _, outcomes = _one_key(state, _seen("dynamics", opted_in, 6))
        assert outcomes == [outcome]


def test_the_first_record_that_matches_decides_whether_a_read_is_our_echo() -> None:
    state = KeyState(key=KEY, register=_register("dotdigital", True, 0)).with_writes(
        "dotdigital", (_record("dotdigital", False, 5, None), _record("dotdigital", False, 5, 7)))
    after, outcomes = _one_key(state, _seen("dotdigital", False, 6))
    assert outcomes == [Outcome.APPLIED]   # the in-flight record matched first: an opt-out
    assert after.register is not None and after.register.opted_in is False


def test_a_dynamics_window_starts_at_its_whole_second() -> None:
    state = KeyState(key=KEY, register=_register("dotdigital", True, 0)).with_writes(
        "dynamics", (_record("dynamics", True, 5.7, 6.5),))
    _, outcomes = _one_key(state, _seen("dynamics", True, 5))
    assert outcomes == [Outcome.ECHO]


def test_one_epoch_of_a_clock_orders_its_own_stamps_second_against_second() -> None:
    wide = timedelta(seconds=2)
    for epoch, outcome in ((1, Outcome.APPLIED), (UNKNOWN_EPOCH, Outcome.TIE_OPT_OUT_WON)):
        state = KeyState(key=KEY, register=_register("dotdigital", True, 10.2, clock_epoch=epoch,
                                                     uncertainty=wide))
        _, outcomes = _one_key(state, _seen("dotdigital", False, 11.1, clock_epoch=epoch,
                                            uncertainty=wide))
        assert outcomes == [outcome]


def test_an_opt_in_the_ledger_has_forgotten_is_stale_an_opt_out_is_not() -> None:
    state = KeyState(key=KEY, register=_register("dynamics", False, 0)).with_parts(
        horizon=KeyState(key=KEY).horizon.with_("dotdigital", LedgerHorizon(until=at(20))))
    for opted_in, outcome in ((True, Outcome.STALE), (False, Outcome.APPLIED)):
        _, outcomes = _one_key(state, _seen("dotdigital", opted_in, 20))
        assert outcomes == [outcome]


def test_a_same_value_tie_that_may_be_later_reaches_the_register() -> None:
    state = KeyState(key=KEY, register=_register("dynamics", True, 10))
    seen = _seen("dotdigital", True, 10.5, uncertainty=timedelta(seconds=1))
    after, outcomes = _one_key(state, seen)
    assert outcomes == [Outcome.TIE_SAME_VALUE]
    assert after.register == Register.of(seen)


def test_more_writes_than_are_kept_are_forgotten_into_the_horizon() -> None:
    records = tuple(_record("dynamics", True, start, start + 1)
                    for start in range(10, 10 + MAX_WRITE_RECORDS + 1))
    state = KeyState(key=KEY, register=_register("dotdigital", True, 0)).with_writes(
        "dynamics", records)
    after, _ = _one_key(state, _seen("dynamics", False, 30))
    assert after.writes.dynamics == records[1:]
    assert after.horizon.dynamics == LedgerHorizon(until=at(11))


def test_a_clock_that_stepped_orders_what_a_side_holds_in_our_time_base() -> None:
    state = KeyState(key=KEY).with_known("dotdigital", Known(opted_in=True, as_of=at(10)))
    seen = _seen("dotdigital", False, 9, offset=timedelta(seconds=-3))
    after, _ = _one_key(state, seen)
    assert after.known.dotdigital == Known.of(seen)


def test_an_opt_in_read_again_across_a_clock_step_that_a_fold_decided_is_a_duplicate() -> None:
    # our write of the register's opt-out is what dotdigital holds; its earlier opt-in, read
    # again after the clock stepped, is placed as the hull of two epochs: later than our write
    register = _register("dynamics", False, 20)
    state = KeyState(key=KEY, register=register).with_known(
        "dynamics", Known(opted_in=False, as_of=at(20))).with_known(
        "dotdigital", Known(opted_in=False, as_of=at(21)))
    again = _seen("dotdigital", True, 40, offset=timedelta(seconds=15),
                  uncertainty=timedelta(seconds=15), clock_epoch=UNKNOWN_EPOCH)
    assert ask_if_decided(opted_in=True, clock_epoch=UNKNOWN_EPOCH)
    # not decided before: taken for what dotdigital holds, so the opt-out is written again
    after, outcomes = _one_key(state, again)
    assert after.known.dotdigital == Known.of(again)
    assert outstanding(after) == (WriteCommand.for_register(key=KEY, side="dotdigital",
                                                            register=register),)
    # decided before: a duplicate; dotdigital holds our write, nothing is written
    after, outcomes = _one_key(state, again, decided=frozenset({again}))
    assert outcomes == [Outcome.DUPLICATE]
    assert after == state
    assert outstanding(after) == ()


def test_an_opt_out_read_again_is_decided_again_whatever_the_ledger_says() -> None:
    # placed too early the first time (before the step was measured), it must still win now
    state = KeyState(key=KEY, register=_register("dynamics", True, 20)).with_known(
        "dotdigital", Known(opted_in=True, as_of=at(21)))
    again = _seen("dotdigital", False, 40, offset=timedelta(seconds=15),
                  uncertainty=timedelta(seconds=15), clock_epoch=UNKNOWN_EPOCH)
    assert not ask_if_decided(opted_in=False, clock_epoch=UNKNOWN_EPOCH)
    after, outcomes = _one_key(state, again, decided=frozenset({again}))
    assert outcomes != [Outcome.DUPLICATE]
    assert after.known.dotdigital == Known.of(again)


def test_only_opt_ins_placed_across_epochs_are_asked_about() -> None:
    assert [(opted_in, epoch) for opted_in, epoch in product((True, False), (0, 3, UNKNOWN_EPOCH))
            if ask_if_decided(opted_in=opted_in, clock_epoch=epoch)] == [(True, UNKNOWN_EPOCH)]


def _as_ints(part: Any) -> Any:
    """``part`` (a row or any part of one) with 0/1 for every bool."""
    if isinstance(part, bool):
        return int(part)
    if isinstance(part, tuple):
        parts = [_as_ints(p) for p in part]
        return type(part)(*parts) if hasattr(part, "_fields") else tuple(parts)
    return part


@examples(300)
@given(batch=batches())
def test_rows_with_0_and_1_for_booleans_fold_as_with_bools(batch: Batch) -> None:
    state_rows = {key_tuple(k): state_row(s) for k, s in batch.states.items()}
    observation_rows = [observation_row(o) for o in batch.observations]
    suppressed = {e for e, c in batch.contacts.items() if c.suppressed}
    with_bools = fold_rows(state_rows, observation_rows, suppressed=suppressed)
    with_ints = fold_rows({k: _as_ints(s) for k, s in state_rows.items()},
                          [_as_ints(o) for o in observation_rows], suppressed=suppressed)
    assert ({k: key_state(key_of(k), s) for k, s in with_ints.states.items()}
            == {k: key_state(key_of(k), s) for k, s in with_bools.states.items()})
    assert (with_ints.changed, with_ints.outcomes) == (with_bools.changed, with_bools.outcomes)
    assert ([history_entry(h, recorded_at=RECORDED) for h in with_ints.history]
            == [history_entry(h, recorded_at=RECORDED) for h in with_bools.history])
    assert ({k: [write_command(key_of(k), c) for c in commands]
             for k, commands in with_ints.commands.items()}
            == {k: [write_command(key_of(k), c) for c in commands]
                for k, commands in with_bools.commands.items()})


def test_observe_takes_the_contact_state_of_each_observation_as_fold_observe_does() -> None:
    seen = _seen("dotdigital", True, 1)
    unsubscribed = ContactState(account="acme", email=KEY.email, status="Unsubscribed", since=T0)
    fold = Fold(states={}, recorded_at=RECORDED)
    rows: RowFold[KeyTuple] = RowFold(states={})
    for contact in (unsubscribed, None):
        fold.observe(seen, contact=contact)
        rows.observe(observation_row(seen), suppressed=contact is not None)
    assert [OUTCOMES[code] for code in rows.outcomes] == fold.outcomes == [
        Outcome.SUPPRESSED, Outcome.APPLIED]
    assert rows.parked == [observation_row(seen)]
    assert {key_of(k): key_state(key_of(k), s) for k, s in rows.states.items()} == fold.states


@examples(300)
@given(batch=batches())
def test_an_observation_converted_to_a_row_and_back_is_the_same(batch: Batch) -> None:
    for observation in batch.observations:
        assert observation_of_row(observation_row(observation)) == observation
