"""CPU cost of the batch fold kernel against ``fold_batch``: ``python -m bench.kernel_cost``.

Both fold the same realistic batch (:func:`bench.domain_cost.realistic_batch`: 2,000
observations from both sides on 2,000 keys, half with a stored state and write records, ties,
echoes, redeliveries and suppressed contacts), each timed in CPU time (the machine is shared),
the median of several repeats, reported in microseconds per observation:

1. **fold_batch**: :func:`common.domain.fold_batch` on the dataclasses.
2. **kernel**: :func:`common.domain.kernel.fold_rows` on rows made beforehand.
3. The conversions a caller holding dataclasses pays around the kernel, apart: **states in**
   (every loaded state to a row), **observations in** (every observation to a row), **states
   out** (the changed states back to dataclasses) and **history out** (the history entries).
   **kernel with conversions** is the kernel and all four: what replacing ``fold_batch`` in
   place would cost, before the ledger and the messages hold rows themselves.
4. The writer's ledger rules on the batch's outcome: every command it leaves outstanding is
   begun and recorded (a 300 ms window, Dataverse's new version) on the state the batch left,
   in microseconds per write: **writer_dataclasses** (:func:`common.domain.begin_write` and
   :func:`~common.domain.record_write`) and **writer_rows** (their mirrors in
   :mod:`common.domain.kernel_writes`, on rows and command rows made beforehand).

Before timing, the kernel's results are checked against ``fold_batch``'s (states and history),
and the writer's rows against the dataclasses' states, so a figure is never of a kernel that
decides differently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

from bench.domain_cost import NOW, cpu_seconds, realistic_batch, report
from common.domain import (
    HistoryEntry,
    KeyState,
    Observation,
    PreferenceKey,
    WriteCommand,
    begin_write,
    fold_batch,
    outstanding,
    record_write,
    rows,
)
from common.domain.clock import to_us
from common.domain.kernel import RowFold, fold_rows
from common.domain.kernel_writes import begin_write_row, record_write_row
from common.domain.rows import CommandRow, KeyTuple, ObservationRow, StateRow

# The vendor-clock window of each write: from the batch's time, as long as a round trip.
WINDOW_START = NOW
WINDOW_END = NOW + timedelta(milliseconds=300)


def states_in(states: Mapping[PreferenceKey, KeyState]) -> dict[KeyTuple, StateRow]:
    return {rows.key_tuple(key): rows.state_row(state) for key, state in states.items()}


def observations_in(observations: Sequence[Observation]) -> list[ObservationRow[KeyTuple]]:
    return [rows.observation_row(o) for o in observations]


def states_out(fold: RowFold[KeyTuple]) -> dict[PreferenceKey, KeyState]:
    """The changed states, as dataclasses."""
    changed = {}
    for key in fold.changed:
        preference_key = rows.key_of(key)
        changed[preference_key] = rows.key_state(preference_key, fold.states[key])
    return changed


def history_out(fold: RowFold[KeyTuple]) -> list[HistoryEntry]:
    return [rows.history_entry(h, recorded_at=NOW) for h in fold.history]


@dataclass(frozen=True, kw_only=True, slots=True)
class Write:
    """A command the writer makes, on the state it holds, as dataclasses and as rows."""

    state: KeyState
    command: WriteCommand
    produced_version: int | None
    state_row: StateRow
    command_row: CommandRow


def writes_to_make(states: Mapping[PreferenceKey, KeyState]) -> list[Write]:
    """Every command ``states`` leave outstanding (Dynamics' with a new row version)."""
    return [Write(state=state, command=command, state_row=rows.state_row(state),
                  command_row=rows.command_row(command),
                  produced_version=9_000 + i if command.side == "dynamics" else None)
            for i, state in enumerate(states.values()) for command in outstanding(state)]


def written_dataclasses(writes: Sequence[Write]) -> list[KeyState]:
    return [record_write(begin_write(w.state, w.command, window_start=WINDOW_START), w.command,
                         produced_version=w.produced_version, window_start=WINDOW_START,
                         window_end=WINDOW_END, written_at=WINDOW_END) for w in writes]


def written_rows(writes: Sequence[Write]) -> list[StateRow]:
    start_us, end_us = to_us(WINDOW_START), to_us(WINDOW_END)
    return [record_write_row(begin_write_row(w.state_row, w.command_row, window_start_us=start_us),
                             w.command_row, produced_version=w.produced_version,
                             window_start_us=start_us, window_end_us=end_us, written_at_us=end_us)
            for w in writes]


def measure(*, repeats: int) -> dict[str, float]:
    states, observations, contacts = realistic_batch()
    suppressed = {email for email, contact in contacts.items() if contact.suppressed}
    state_rows, observation_rows = states_in(states), observations_in(observations)
    folded = fold_rows(state_rows, observation_rows, suppressed=suppressed)
    expected = fold_batch(states, observations, contacts=contacts, recorded_at=NOW)
    if (states_out(folded), history_out(folded)) != (expected.changed_states(), expected.history):
        raise AssertionError("the kernel folds the batch differently from fold_batch")

    seconds = {
        "fold_batch": cpu_seconds(lambda: fold_batch(states, observations, contacts=contacts,
                                                     recorded_at=NOW), repeats=repeats),
        "kernel": cpu_seconds(lambda: fold_rows(state_rows, observation_rows,
                                                suppressed=suppressed), repeats=repeats),
        "states_in": cpu_seconds(lambda: states_in(states), repeats=repeats),
        "observations_in": cpu_seconds(lambda: observations_in(observations), repeats=repeats),
        "states_out": cpu_seconds(lambda: states_out(folded), repeats=repeats),
        "history_out": cpu_seconds(lambda: history_out(folded), repeats=repeats),
    }
    seconds["kernel_with_conversions"] = sum(seconds.values()) - seconds["fold_batch"]
    figures = {f"{name}_us_per_observation": value / len(observations) * 1e6
               for name, value in seconds.items()}

    writes = writes_to_make(expected.states)
    if ([rows.key_state(w.state.key, row) for w, row in zip(writes, written_rows(writes),
                                                            strict=True)]
            != written_dataclasses(writes)):
        raise AssertionError("the writer's rules on rows record the writes differently")
    for name, work in (("writer_dataclasses", lambda: written_dataclasses(writes)),
                       ("writer_rows", lambda: written_rows(writes))):
        figures[f"{name}_us_per_write"] = cpu_seconds(work, repeats=repeats) / len(writes) * 1e6
    return figures


def main(argv: list[str] | None = None) -> int:
    return report(argv, prog="python -m bench.kernel_cost", description=__doc__, measure=measure)


if __name__ == "__main__":
    raise SystemExit(main())
