"""How to store a key's state row: a column per field, or one array: ``python -m
bench.state_layout_cost``.

The same 2,000 state rows (:class:`common.domain.rows.StateRow`, with a confirmed write record)
are stored in SQLite two ways, in tables of their own in memory, and each is loaded back into
rows and saved over, as the ledger does for a batch:

1. **columns**: the register, what each side is known to hold, the pending writes and the
   horizons in 26 columns (integers, and the change id), the write records (a list of any
   length) in an array beside them;
2. **array**: the whole row in one array, format 2 of :mod:`common.store.codec`.

Reported in CPU microseconds per state, the median of several repeats.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from common.domain import PreferenceKey
from common.domain.rows import StateRow
from common.store.codec import decode_row, encode_row

STATES = 2_000
T = 1_772_366_400_000_000
KEY = PreferenceKey(account="acme", email="ann@example.com", preference_id=1)
COLUMNS = ("r_opted_in", "r_origin", "r_side", "r_change_id", "r_offset", "r_uncertainty",
           "r_bounded", "r_epoch",
           *(f"k{side}_{name}" for side in (0, 1)
             for name in ("opted_in", "as_of", "version", "stamp", "offset")),
           *(f"p{side}_{name}" for side in (0, 1) for name in ("opted_in", "origin")),
           *(f"h{side}_{name}" for side in (0, 1) for name in ("until", "version")))


def _state(i: int) -> StateRow:
    return StateRow(
        register=(True, T + i, 0, f"dyn:{i}", 0, 0, None, 0),
        known=((True, T + i, 5, None, 0), (False, T + i - 5, None, None, 0)),
        pending=((True, T + i), None),
        writes=((), ((True, T, T + 1, T + 2, None, T + 3),)),
        horizon=(None, None), revision=1)


def _flat(row: StateRow) -> list[Any]:
    register = row.register or (None,) * 8
    parts: list[Any] = list(register)
    for known in row.known:
        parts += known or (None,) * 5
    for pending in row.pending:
        parts += pending or (None,) * 2
    for horizon in row.horizon:
        parts += horizon or (None,) * 2
    return parts


def _part(values: tuple[Any, ...]) -> Any:
    return None if values[0] is None else values


def _from_columns(r: tuple[Any, ...]) -> StateRow:
    writes = r[28]
    return tuple.__new__(StateRow, (
        _part(r[2:10]), (_part(r[10:15]), _part(r[15:20])), (_part(r[20:22]), _part(r[22:24])),
        ((), ()) if writes is None else tuple(tuple(map(tuple, side))
                                                for side in orjson.loads(writes)),
        (_part(r[24:26]), _part(r[26:28])), r[1]))


def _median_us(job: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        cpu = time.process_time()
        job()
        samples.append(time.process_time() - cpu)
    return statistics.median(samples) * 1e6 / STATES


def measure(*, repeats: int) -> dict[str, float]:
    db = sqlite3.connect(":memory:")
    db.execute(f"CREATE TABLE cols (k INTEGER PRIMARY KEY, revision INTEGER, "
               f"{', '.join(COLUMNS)}, writes BLOB)")
    db.execute("CREATE TABLE arr (k INTEGER PRIMARY KEY, revision INTEGER, state BLOB)")
    states = [_state(i) for i in range(STATES)]
    marks = ", ".join("?" for _ in COLUMNS)
    for i, row in enumerate(states):
        db.execute(f"INSERT INTO cols VALUES (?, ?, {marks}, ?)",
                   (i, 1, *_flat(row), orjson.dumps(row.writes)))
        db.execute("INSERT INTO arr VALUES (?, ?, ?)", (i, 1, encode_row(row)))
    if [_from_columns(r) for r in db.execute("SELECT * FROM cols")] != states:
        raise RuntimeError("the columns do not hold the rows")
    assignments = ", ".join(f"{c} = ?" for c in COLUMNS)

    def save_columns() -> None:
        db.executemany(f"UPDATE cols SET revision = ?, {assignments}, writes = ? WHERE k = ?",
                       [(2, *_flat(row), orjson.dumps(row.writes), i)
                        for i, row in enumerate(states)])

    def save_array() -> None:
        db.executemany("UPDATE arr SET revision = ?, state = ? WHERE k = ?",
                       [(2, encode_row(row), i) for i, row in enumerate(states)])

    return {
        "columns: load": _median_us(
            lambda: [_from_columns(r) for r in db.execute("SELECT * FROM cols")], repeats),
        "array: load": _median_us(
            lambda: [decode_row(KEY, revision, blob)
                     for _, revision, blob in db.execute("SELECT * FROM arr")], repeats),
        "columns: save": _median_us(save_columns, repeats),
        "array: save": _median_us(save_array, repeats),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.state_layout_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    figures = measure(repeats=args.repeats)
    print(", ".join(f"{what} {us:.2f}" for what, us in figures.items())
          + f" µs CPU per state ({STATES:,} states, median of {args.repeats})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
