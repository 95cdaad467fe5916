"""Measure one compare-and-set save of many realistic key states (not a test: run by hand).

    .venv/bin/python -m tests.integration.store.save_throughput [count] [sqlite-url]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from common.domain import HistoryEntry, Observation, PreferenceKey, reconcile, record_write
from common.store import open_store


async def main(count: int, url: str) -> None:
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    changes = []
    for i in range(count):
        key = PreferenceKey(account="acme", email=f"person{i}@example.com",
                            preference_id=1000 + i % 7)
        o = Observation(key=key, side="dynamics", opted_in=bool(i % 2), origin_time=t0,
                        version=i + 1, change_id=f"dyn:{i}")
        d = reconcile(None, o)
        state = d.state
        for command in d.commands:
            state = record_write(state, command, produced_version=None,
                                 window_start=t0 + timedelta(seconds=1),
                                 window_end=t0 + timedelta(seconds=2),
                                 written_at=t0 + timedelta(seconds=2))
        changes.append((None, state, HistoryEntry.for_observation(
            o, decision=d.outcome, recorded_at=t0)))
    async with open_store(url) as store:
        with timed("insert + history") as report:
            revisions = await store.save(changes)
        states = [state for _, state, _ in changes]
        with timed("CAS update", report):
            await store.save([(r, s, None) for r, s in zip(revisions, states, strict=True)])
        with timed("load", report):
            loaded = await store.load(s.key for s in states)
    assert len(loaded) == count
    print(f"{count} key states: " + "; ".join(report))


@contextmanager
def timed(what: str, report: list[str] | None = None) -> Iterator[list[str]]:
    """Wall and CPU time (all threads: SQLite runs in the store's own) of the block."""
    report = [] if report is None else report
    wall, cpu = time.perf_counter(), time.process_time()
    yield report
    report.append(f"{what} {1000 * (time.perf_counter() - wall):.0f} ms wall / "
                  f"{1000 * (time.process_time() - cpu):.0f} ms cpu")


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(n, sys.argv[2] if len(sys.argv) > 2 else f"sqlite:///{tmp}/ledger.db"))
