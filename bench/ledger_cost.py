"""CPU cost of the ledger store per key state, for one reconciler-sized batch.

    .venv/bin/python -m bench.ledger_cost [--backend sqlite|postgresql] [--rounds N] [--emails N]

Each round takes a batch of 2,000 key states (400 emails x 5 preferences; ``--emails`` for
smaller batches, where what each call costs whatever its size weighs more) through the store's
own API as the reconciler does: saved new with a history row each, loaded, then saved again
with compare-and-set on the revisions it loaded and another history row each; then the same
on the batch hot path's rows (``load_rows``, ``save_rows`` with the kernel's history rows). Only the store's
calls are timed, in process CPU time (SQLite's thread and asyncpg's work count; PostgreSQL's
server does not). Every round uses new emails, so the ledger grows as it would. The first
round warms up and is not counted; the figures are medians of the others, in microseconds of
CPU per key state. SQLite runs on a file in a temporary directory, PostgreSQL on a schema of
its own (``PREFSYNC_TEST_POSTGRES_URL``, as the store tests), dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

from common.domain import HistoryEntry, KeyState, Observation, PreferenceKey, reconcile
from common.domain.rows import DECISIONS, key_tuple
from common.store import Change, LedgerStore, open_store
from tests.integration.store.backends import postgres_schema

EMAILS = 400
PREFERENCES = 5
_T0 = datetime(2026, 3, 1, tzinfo=UTC)


def _observe(round_number: int, states: dict[PreferenceKey, KeyState], *, emails: int,
             side: str, step: int) -> tuple[list[Change], list[HistoryEntry]]:
    """One decision per key of the round's batch, as the reconciler folds and saves them."""
    changes: list[Change] = []
    history: list[HistoryEntry] = []
    for e in range(emails):
        for p in range(PREFERENCES):
            key = PreferenceKey(account="acme", email=f"r{round_number}.person{e}@example.com",
                                preference_id=1000 + p)
            observation = Observation(
                key=key, side="dynamics" if side == "dynamics" else "dotdigital",
                opted_in=bool((e + p + step) % 2), origin_time=_T0 + timedelta(minutes=step),
                version=step + 1 if side == "dynamics" else None,
                change_id=f"{side}:{round_number}:{e}:{p}:{step}")
            stored = states.get(key)
            decision = reconcile(stored, observation)
            changes.append((None if stored is None else stored.revision, decision.state, None))
            history.append(HistoryEntry.for_observation(
                observation, decision=decision.outcome,
                recorded_at=_T0 + timedelta(minutes=step, seconds=1)))
    return changes, history


async def _round(store: LedgerStore, number: int, *, emails: int) -> dict[str, float]:
    """CPU microseconds per key state of each store call of one round."""
    per_state: dict[str, float] = {}
    changes, history = _observe(number, {}, emails=emails, side="dynamics", step=0)
    cpu = time.process_time()
    await store.save(changes, history=history)
    per_state["save new"] = (time.process_time() - cpu) * 1e6 / len(changes)
    keys = [state.key for _, state, _ in changes]
    cpu = time.process_time()
    loaded = await store.load(keys)
    per_state["load"] = (time.process_time() - cpu) * 1e6 / len(keys)
    if len(loaded) != len(keys):
        raise RuntimeError(f"loaded {len(loaded)} of {len(keys)} key states")
    changes, history = _observe(number, loaded, emails=emails, side="dotdigital", step=1)
    cpu = time.process_time()
    await store.save(changes, history=history)
    per_state["save update"] = (time.process_time() - cpu) * 1e6 / len(changes)
    # the batch hot path: the same states as rows, and the kernel's history rows
    tuples = [key_tuple(k) for k in keys]
    cpu = time.process_time()
    rows = await store.load_rows(tuples)
    per_state["load rows"] = (time.process_time() - cpu) * 1e6 / len(tuples)
    row_changes = [(rows[k].revision, k, rows[k]._replace(register=None)) for k in tuples]
    decided = [(k, 1, True, 0, "dd:x", DECISIONS.index("applied"), 0) for k in tuples]
    cpu = time.process_time()
    await store.save_rows(row_changes, history=decided, recorded_at=_T0)
    per_state["save rows"] = (time.process_time() - cpu) * 1e6 / len(row_changes)
    return per_state


@asynccontextmanager
async def _ledger_url(backend: str) -> AsyncIterator[str]:
    if backend == "postgresql":
        async with postgres_schema() as url:
            yield url
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield f"sqlite:///{tmp}/ledger.db"


async def measure(*, backend: str, rounds: int, emails: int = EMAILS) -> dict[str, float]:
    """Median CPU microseconds per key state of each call, over ``rounds`` counted rounds."""
    async with _ledger_url(backend) as url, open_store(url) as store:
        # warm-up: imports, statement caches, the file's first pages
        await _round(store, 0, emails=emails)
        samples = [await _round(store, n, emails=emails) for n in range(1, rounds + 1)]
    return {what: statistics.median(s[what] for s in samples) for what in samples[0]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), action="append")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--emails", type=int, default=EMAILS,
                        help=f"emails per batch, {PREFERENCES} preferences each")
    args = parser.parse_args(argv)
    for backend in args.backend or ("sqlite", "postgresql"):
        figures = asyncio.run(measure(backend=backend, rounds=args.rounds, emails=args.emails))
        print(f"{backend}: " + ", ".join(f"{what} {us:.1f}" for what, us in figures.items())
              + f" µs CPU per key state ({args.emails * PREFERENCES} states, median of "
              f"{args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
