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

Before timing, the kernel's results are checked against ``fold_batch``'s (states and history),
so a figure is never of a kernel that folds differently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bench.domain_cost import NOW, cpu_seconds, realistic_batch, report
from common.domain import HistoryEntry, KeyState, Observation, PreferenceKey, fold_batch, rows
from common.domain.kernel import RowFold, fold_rows
from common.domain.rows import KeyTuple, ObservationRow, StateRow


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
    return {f"{name}_us_per_observation": value / len(observations) * 1e6
            for name, value in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    return report(argv, prog="python -m bench.kernel_cost", description=__doc__, measure=measure)


if __name__ == "__main__":
    raise SystemExit(main())
