"""The writer's ledger rules on rows (:mod:`common.domain.kernel_writes`) do what
:mod:`common.domain.writes` does on the dataclasses: on random stored states, commands and
write windows, their results converted back are the same states (the same row object where the
specification returns the same state), the same answers and the same errors.

Commands are drawn partly from the state, so that the rare branches occur in most examples: the
register's own command (not superseded), the side's pending write, a write the side's records
are of (in flight: the retried begin and the record that closes it), and the other value than
the side is known to hold (with a window drawn around that read: the "other value read inside
our write's window" branch). Windows ending before they start check that the error is alike."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from itertools import product

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from common.domain import (
    SIDES,
    ContactState,
    KeyState,
    Known,
    Register,
    Side,
    WriteCommand,
    WriteRecord,
    abandon_write,
    begin_write,
    is_superseded,
    outstanding,
    record_write,
    reopen,
    writer_should_apply,
)
from common.domain.clock import ZERO, duration_us, to_us
from common.domain.kernel import outstanding_rows
from common.domain.kernel_writes import (
    abandon_write_row,
    begin_write_row,
    is_superseded_row,
    prune_writes_row,
    record_write_row,
    reopen_row,
    writer_should_apply_row,
)
from common.domain.rows import (
    DECISIONS,
    StateRow,
    _write_row,
    command_row,
    key_state,
    key_tuple,
    state_row,
    write_command,
)
from common.domain.sides import SIDE_CODES
from common.domain.writes import IN_FLIGHT_LIMIT, prune_writes
from tests.unit.domain.builders import T0, at, examples
from tests.unit.domain.test_kernel import (
    CHANGE_IDS,
    KEYS,
    MOMENTS,
    OFFSETS,
    VERSIONS,
    WRITTEN_REGISTERS,
    _as_ints,
    booleans,
    key_states,
    moments,
    sides,
)

KEY = KEYS[0]
states = key_states(KEY)
origins = st.sampled_from(MOMENTS + WRITTEN_REGISTERS)
command_sources = st.sampled_from(list(product(SIDES, CHANGE_IDS)))
command_kinds = st.sampled_from(["register", "pending", "record", "other value", "other value",
                                 "random"])
# Dataverse's new row version, or none (dotdigital's, and a Dataverse write confirmed without it)
produced_versions = st.sampled_from([None, *VERSIONS])
offsets = st.sampled_from(OFFSETS)
window_kinds = st.sampled_from(["random", "around what is known", "around a record"])
# A window's start before a read or a record's start, its end after; some ends come before
# their start (refused).
BEFORE = [timedelta(seconds=-2), timedelta(seconds=-1), timedelta(microseconds=-1), ZERO]
AFTER = [ZERO, timedelta(microseconds=1), timedelta(milliseconds=1), timedelta(seconds=1),
         timedelta(microseconds=-1)]
LENGTHS = [ZERO, timedelta(microseconds=1), timedelta(milliseconds=400), timedelta(seconds=2),
           IN_FLIGHT_LIMIT, timedelta(microseconds=-1)]
befores, afters, lengths = st.sampled_from(BEFORE), st.sampled_from(AFTER), st.sampled_from(LENGTHS)
contacts = st.sampled_from([None, *(ContactState(account="acme", email=KEY.email, status=status,
                                                 since=T0)
                                    for status in ("Subscribed", "Unsubscribed"))])


@st.composite
def commands(draw: st.DrawFn, state: KeyState) -> tuple[WriteCommand, str]:
    """A command for ``state``'s key, and its kind (reported as an event)."""
    kind, side = draw(command_kinds), draw(sides)
    if kind == "other value" and draw(booleans):
        side = "dotdigital"  # mostly: its writes have no version, the subtle branch is theirs
    origin_side, change_id = draw(command_sources)
    register, pending, known = state.register, state.pending.get(side), state.known.get(side)
    records = state.writes.get(side)
    value: tuple[bool, datetime] | None = None
    if kind == "register" and register is not None:
        value = register.opted_in, register.origin_time
    elif kind == "pending" and pending is not None:
        value = pending.opted_in, pending.origin_time
    elif kind == "record" and records:
        record = draw(st.sampled_from(records))
        value = record.opted_in, record.register_origin_time
    elif kind == "other value" and known is not None:
        value = not known.opted_in, draw(origins)
    if value is None:
        kind, value = "random", (draw(booleans), draw(origins))
    event(f"command: {kind}")
    return WriteCommand(key=state.key, side=side, opted_in=value[0], origin_time=value[1],
                        origin_side=origin_side, change_id=change_id), kind


@dataclass(frozen=True, kw_only=True)
class Write:
    """A state, a command for it, and a write of that command (for ``record_write``)."""

    state: KeyState
    command: WriteCommand
    produced_version: int | None
    window_start: datetime
    window_end: datetime
    written_at: datetime
    offset: timedelta
    read_before: datetime | None = None


@st.composite
def writes(draw: st.DrawFn) -> Write:
    state = draw(states)
    command, command_kind = draw(commands(state))
    # the other value than the side holds, written around that read: the subtle branch
    kind = "around what is known" if command_kind == "other value" else draw(window_kinds)
    known, records = state.known.get(command.side), state.writes.get(command.side)
    if kind == "around what is known" and known is not None:
        start, end = known.as_of + draw(befores), known.as_of + draw(afters)
    elif kind == "around a record" and records:
        start = draw(st.sampled_from(records)).window_start + draw(befores)
        end = start + draw(lengths)
    else:
        kind = "random"
        start = draw(moments)
        end = start + draw(lengths)
    event(f"window: {kind}")
    produced_version, offset = draw(produced_versions), draw(offsets)
    if command_kind == "other value" and known is not None:
        # no version to order the two (dotdigital's writes), the clock as the read was stamped,
        # and (half the time) a register that follows the read
        produced_version = None
        offset = known.offset if draw(booleans) else offset
        if state.register is not None and draw(booleans):
            state = replace(state, register=replace(state.register, opted_in=known.opted_in))
    # what the read before the write returned: none, the change known (the subtle case), or
    # another stamp
    read_before = draw(st.sampled_from([None, None if known is None else known.as_of, start]))
    return Write(state=state, command=command, produced_version=produced_version,
                 window_start=start, window_end=end, written_at=draw(moments), offset=offset,
                 read_before=read_before)


def _recorded_as_rows(write: Write, row: StateRow) -> StateRow:
    return record_write_row(row, command_row(write.command),
                            produced_version=write.produced_version,
                            window_start_us=to_us(write.window_start),
                            window_end_us=to_us(write.window_end),
                            written_at_us=to_us(write.written_at),
                            offset_us=duration_us(write.offset),
                            read_before_us=(None if write.read_before is None
                                            else to_us(write.read_before)))


def _recorded(write: Write, state: KeyState) -> KeyState:
    return record_write(state, write.command, produced_version=write.produced_version,
                        window_start=write.window_start, window_end=write.window_end,
                        written_at=write.written_at, offset=write.offset,
                        read_before=write.read_before)


def _knowledge_event(write: Write, after: KeyState) -> str:
    """Which of ``record_write``'s ways with what the side is known to hold ``write`` took."""
    command, side = write.command, write.command.side
    if side == "dynamics" and write.produced_version is None:
        return "Dataverse without its version: known untouched"
    read = write.state.known.get(side)
    # as of this attempt's start, whenever an earlier attempt began
    wrote = Known(opted_in=command.opted_in, as_of=write.window_start,
                  version=write.produced_version, offset=write.offset)
    if wrote.is_newer_than(read):
        return "our write is newer: known moves to it"
    if (read is not None and read.stamp is None and read.as_of == write.read_before
            and after.known.get(side) == wrote):
        return "the change read before the write: known moves to it"
    if after.known.get(side) != read:
        return "the other value read inside the window: taken to hold our write"
    return "the read is newer: known kept"


# -- the property tests ----------------------------------------------------------------------

@examples(2000)
@given(write=writes(), begun=booleans)
def test_record_write_row_is_record_write(write: Write, begun: bool) -> None:
    state, row = write.state, state_row(write.state)
    if begun:  # as the writer does: the write in flight from its window's start, then recorded
        state = begin_write(state, write.command, window_start=write.window_start)
        row = begin_write_row(row, command_row(write.command),
                              window_start_us=to_us(write.window_start))
        assert key_state(KEY, row) == state
    try:
        expected = _recorded(write, state)
    except ValueError as error:
        event("record: the window ends before it starts (refused)")
        with pytest.raises(ValueError, match=str(error)):
            _recorded_as_rows(write, row)
        return
    after = _recorded_as_rows(write, row)
    assert key_state(KEY, after) == expected
    assert after is not row  # a write is always recorded
    if any(r.in_flight and r.opted_in == write.command.opted_in
           and r.register_origin_time == write.command.origin_time
           for r in state.writes.get(write.command.side)):
        event("record: closes a record in flight")
    if expected.horizon != state.horizon:
        event("record: pruned (the horizon widened)")
    event(f"record: {_knowledge_event(write, expected)}")


@examples(1000)
@given(write=writes())
def test_begin_write_row_is_begin_write_and_the_same_row_when_it_returns_the_same_state(
        write: Write) -> None:
    row = state_row(write.state)
    expected = begin_write(write.state, write.command, window_start=write.window_start)
    after = begin_write_row(row, command_row(write.command),
                            window_start_us=to_us(write.window_start))
    assert key_state(KEY, after) == expected
    assert (after is row) == (expected is write.state)
    # the writer saves a begun write without touching the index of outstanding keys
    assert (after.register, after.known) == (row.register, row.known)
    if expected is write.state:
        event("begin: the same write already in flight (same state)")
    elif expected.horizon != write.state.horizon:
        event("begin: recorded, then pruned (the horizon widened)")
    else:
        event("begin: recorded")


@examples(500)
@given(write=writes())
def test_abandon_write_row_is_abandon_write_and_the_same_row_when_nothing_is_forgotten(
        write: Write) -> None:
    row = state_row(write.state)
    expected = abandon_write(write.state, write.command)
    after = abandon_write_row(row, command_row(write.command))
    assert key_state(KEY, after) == expected
    assert (after is row) == (expected == write.state)
    event("abandon: forgets a record in flight" if after is not row else "abandon: nothing to forget")


@examples(300)
@given(state=states, side=sides)
def test_prune_writes_row_is_prune_writes_and_the_same_row_when_nothing_is_dropped(
        state: KeyState, side: Side) -> None:
    row = state_row(state)
    expected = prune_writes(state, side)
    after = prune_writes_row(row, side=SIDE_CODES[side])
    assert key_state(KEY, after) == expected
    assert (after is row) == (expected is state)
    event("prune: nothing dropped" if expected is state else "prune: records dropped")


@examples(500)
@given(write=writes())
def test_is_superseded_row_answers_as_is_superseded(write: Write) -> None:
    expected = is_superseded(write.state, write.command)
    assert is_superseded_row(state_row(write.state), command_row(write.command)) is expected
    event(f"superseded: {expected}")


@examples(500)
@given(write=writes(), contact=contacts)
def test_writer_should_apply_row_answers_as_writer_should_apply(
        write: Write, contact: ContactState | None) -> None:
    expected = writer_should_apply(write.state, write.command, contact=contact)
    assert writer_should_apply_row(
        state_row(write.state), command_row(write.command),
        suppressed=contact is not None and contact.suppressed) is expected
    event(f"should apply: {expected}")


@examples(200)
@given(write=writes(), begun=booleans)
def test_rows_with_0_and_1_for_booleans_are_written_as_with_bools(write: Write,
                                                                  begun: bool) -> None:
    command = command_row(write.command)
    with_bools, with_ints = state_row(write.state), _as_ints(state_row(write.state))
    int_command = _as_ints(command)
    if begun:
        start = to_us(write.window_start)
        with_bools = begin_write_row(with_bools, command, window_start_us=start)
        with_ints = begin_write_row(with_ints, int_command, window_start_us=start)
        assert key_state(KEY, with_ints) == key_state(KEY, with_bools)
    assert is_superseded_row(with_ints, int_command) is is_superseded_row(with_bools, command)
    assert abandon_write_row(with_ints, int_command) == _as_ints(
        abandon_write_row(with_bools, command))
    if write.window_end >= write.window_start:
        assert key_state(KEY, _recorded_as_rows(write, with_ints)) == key_state(
            KEY, _recorded_as_rows(write, with_bools))


@examples(200)
@given(write=writes())
def test_a_command_converted_to_a_row_and_back_is_the_same(write: Write) -> None:
    assert write_command(KEY, command_row(write.command)) == write.command


# -- the tricky branches, one example each (each checked against the specification) ----------

def _command(side: str, opted_in: bool, origin: float) -> WriteCommand:
    return WriteCommand(key=KEY, side="dotdigital" if side == "dotdigital" else "dynamics",
                        opted_in=opted_in, origin_time=at(origin), origin_side="dynamics",
                        change_id="c1")


def _opted_out_on_dotdigital_at(seconds: float) -> KeyState:
    """A user opted out on dotdigital at ``seconds`` (the register and the read agree)."""
    return KeyState(key=KEY, register=Register(
        opted_in=False, origin_time=at(seconds), origin_side="dotdigital", change_id="out"),
    ).with_known("dotdigital", Known(opted_in=False, as_of=at(seconds)))


def _recorded_by_both(state: KeyState, command: WriteCommand, *, start: float, end: float,
                      produced_version: int | None = None) -> KeyState:
    """``record_write`` of ``command`` in ``[start, end]``, having checked the row version
    agrees."""
    write = Write(state=state, command=command, produced_version=produced_version,
                  window_start=at(start), window_end=at(end), written_at=at(end), offset=ZERO)
    expected = _recorded(write, state)
    assert key_state(KEY, _recorded_as_rows(write, state_row(state))) == expected
    return expected


def test_the_other_value_read_inside_our_window_leaves_our_write_to_be_corrected() -> None:
    # our opt-in (of an older change) went out in [10, 11]; the user's opt-out was read at 10.5:
    # which landed last is unknown, so dotdigital is taken to hold our opt-in, and corrected
    state = _opted_out_on_dotdigital_at(10.5)
    after = _recorded_by_both(state, _command("dotdigital", True, 2), start=10, end=11)
    assert after.known.dotdigital == Known(opted_in=True, as_of=at(10.5))
    row = state_row(after)
    assert outstanding_rows(row.register, row.known) == tuple(
        command_row(c) for c in outstanding(after))
    assert [(c.side, c.opted_in) for c in outstanding(after)] == [
        ("dynamics", False), ("dotdigital", False)]


def test_the_other_value_read_after_our_window_is_what_the_side_holds() -> None:
    state = _opted_out_on_dotdigital_at(11.5)
    after = _recorded_by_both(state, _command("dotdigital", True, 2), start=10, end=11)
    assert after.known.dotdigital == state.known.dotdigital


def test_a_dataverse_write_confirmed_without_its_version_leaves_what_the_row_holds_unknown(
        ) -> None:
    state = KeyState(key=KEY).with_known("dynamics", Known(opted_in=False, as_of=at(1)))
    after = _recorded_by_both(state, _command("dynamics", True, 0), start=10, end=11)
    assert after.known.dynamics == state.known.dynamics
    assert after.writes.dynamics == (WriteRecord(
        side="dynamics", opted_in=True, register_origin_time=at(0), window_start=at(10),
        window_end=at(11), written_at=at(11)),)


def test_a_retried_write_keeps_the_first_attempts_start_for_its_echo_and_knows_the_retry(
        ) -> None:
    command = _command("dotdigital", True, 0)
    first = begin_write(KeyState(key=KEY), command, window_start=at(10))
    first_row = state_row(first)
    # the retry's begin changes nothing: the same row
    assert begin_write_row(first_row, command_row(command), window_start_us=to_us(at(12))) is first_row
    after = _recorded_by_both(first, command, start=12, end=13)
    assert [(r.window_start, r.window_end) for r in after.writes.dotdigital] == [(at(10), at(13))]
    # the retry landed after its own start, whatever the first attempt did
    assert after.known.dotdigital == Known(opted_in=True, as_of=at(12))


def test_the_other_value_stamped_before_this_attempt_but_after_the_in_flight_start_is_overwritten(
        ) -> None:
    """A Dynamics opt-out at 11 beat a dotdigital opt-in at 11.3 (a tie); the opt-out's write
    to dotdigital was begun (in flight) from 7, a margin before the writer's clock estimate,
    and this attempt began at 12, after the opt-in was read: the write landed after it, so
    dotdigital holds the opt-out and no write is outstanding there (before, the opt-in stayed
    known until the echo was read, and the write went out again)."""
    command = _command("dotdigital", False, 11)
    state = KeyState(key=KEY, register=Register(
        opted_in=False, origin_time=at(11), origin_side="dynamics", change_id="out"),
    ).with_known("dotdigital", Known(opted_in=True, as_of=at(11.3)))
    state = begin_write(state, command, window_start=at(7))
    after = _recorded_by_both(state, command, start=12, end=13)
    assert after.known.dotdigital == Known(opted_in=False, as_of=at(12))
    assert "dotdigital" not in [c.side for c in outstanding(after)]


def test_a_window_ending_before_it_starts_is_refused_alike() -> None:
    state = KeyState(key=KEY)
    command = _command("dotdigital", True, 0)
    with pytest.raises(ValueError, match="window_end is before window_start"):
        _recorded_by_both(state, command, start=11, end=10)
    write = Write(state=state, command=command, produced_version=None, window_start=at(11),
                  window_end=at(10), written_at=at(11), offset=ZERO)
    with pytest.raises(ValueError, match="window_end is before window_start"):
        _recorded_as_rows(write, state_row(state))


def test_abandoning_forgets_only_the_write_in_flight() -> None:
    command = _command("dynamics", True, 0)
    state = begin_write(KeyState(key=KEY), _command("dynamics", False, 0), window_start=at(1))
    state = begin_write(state, command, window_start=at(2))
    row = state_row(state)
    after = abandon_write_row(row, command_row(command))
    assert key_state(KEY, after) == abandon_write(state, command)
    assert [r.opted_in for r in key_state(KEY, after).writes.dynamics] == [False]
    assert abandon_write_row(after, command_row(command)) is after


@dataclass(frozen=True, kw_only=True)
class Reopening:
    """A state, a side and a closed write of it (for ``reopen``)."""

    state: KeyState
    side: Side
    closed: WriteRecord
    uncertainty: timedelta


@st.composite
def reopenings(draw: st.DrawFn) -> Reopening:
    """Mostly the case rule 8 is for: an opt-in known, without a version, and an opt-out
    register; the write's window drawn around that opt-in (in flight, or ending before or after
    it)."""
    state, side = draw(states), draw(sides)
    known = state.known.get(side)
    if draw(st.sampled_from([True, True, True, False])):  # the case itself, mostly
        known = (Known(opted_in=True, as_of=draw(moments), offset=draw(offsets))
                 if known is None else replace(known, opted_in=True, version=None, stamp=None))
        state = state.with_known(side, known)
        register = state.register or Register(opted_in=False, origin_time=draw(origins),
                                              origin_side=draw(sides), change_id="drawn")
        register = replace(register, opted_in=False)
        if draw(booleans):  # well before the opt-in: it may move
            register = replace(register, origin_time=known.as_of - timedelta(seconds=30),
                               bounded_time=None)
        state = replace(state, register=register)
    around = known.as_of if known is not None and draw(booleans) else draw(moments)
    start = around + draw(befores)
    end = draw(st.sampled_from([None, around + draw(befores), around + draw(afters),
                                start + draw(lengths)]))
    if end is not None and end < start:
        end = start
    closed = WriteRecord(side=side, opted_in=draw(st.sampled_from([True, True, False])),
                         register_origin_time=draw(origins), window_start=start,
                         window_end=end, produced_version=None,
                         written_at=None if end is None else end)
    uncertainty = draw(st.sampled_from([ZERO, timedelta(milliseconds=300),
                                        timedelta(seconds=1)]))
    return Reopening(state=state, side=side, closed=closed, uncertainty=uncertainty)


@examples(500)
@given(case=reopenings())
def test_reopen_row_is_reopen(case: Reopening) -> None:
    """The same decision, or none, on rows: the same state after it and its outcome."""
    expected = reopen(case.state, side=case.side, closed=case.closed,
                      uncertainty=case.uncertainty)
    got = reopen_row(state_row(case.state), key=key_tuple(KEY), side=SIDE_CODES[case.side],
                     closed=_write_row(case.closed),
                     uncertainty_us=duration_us(case.uncertainty))
    if expected is None:
        assert got is None
        event("reopen: nothing decided again")
        return
    assert got is not None
    after, history = got
    assert key_state(KEY, after) == expected.state
    assert DECISIONS[history[5]] == str(expected.outcome)
    assert history[4] == f"reopened:{case.side}"
    event(f"reopen: {expected.outcome}")
