"""What a save costs the SQLite ledger at each WAL checkpoint interval, on a steady sync's keys.

    .venv/bin/python -m bench.wal_cost [--pages 1000 --pages 10000] [--repeats 3]

A ledger of 20,000 contacts x 5 preferences (the steady scenario's account) is made once. Then,
for each interval (``PRAGMA wal_autocheckpoint``, in pages), on a fresh copy of it: three
stores on the one file (the services sharing it) take turns saving 300 keys picked at random
among all (loaded, then saved with compare-and-set on their revisions, as a round does), 150
saves in all. The loads and the saves are timed apart: process CPU (the stores' SQLite threads
included) per key loaded, and CPU and wall time per key saved. The intervals are measured in
turn, ``--repeats`` times, and the figures are medians. The interval the store uses by
default is :data:`common.store.sqlite.WAL_CHECKPOINT_PAGES`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from common.domain.rows import EMPTY_STATE, KeyTuple
from common.store.sqlite import WAL_CHECKPOINT_PAGES, SqliteLedgerStore

CONTACTS = 20_000
PREFERENCES = 5
KEYS_PER_SAVE = 300
SAVES = 150
STORES = 3


def _keys() -> list[KeyTuple]:
    return [("acme", f"person{c}@example.com", 1000 + p)
            for c in range(CONTACTS) for p in range(PREFERENCES)]


async def _seed(path: Path) -> None:
    store = SqliteLedgerStore(path=str(path))
    await store.open()
    try:
        keys = _keys()
        for i in range(0, len(keys), 5_000):
            await store.save_rows([(None, k, EMPTY_STATE) for k in keys[i:i + 5_000]])
    finally:
        await store.close()


async def _measure(path: Path, *, pages: int, seed: int) -> tuple[float, float, float]:
    """CPU microseconds per key loaded, and CPU and wall microseconds per key saved."""
    stores = [SqliteLedgerStore(path=str(path), wal_checkpoint_pages=pages)
              for _ in range(STORES)]
    for store in stores:
        await store.open()
    try:
        keys = _keys()
        pick = random.Random(seed)
        loading = cpu = wall = 0.0
        for n in range(SAVES):
            store = stores[n % STORES]
            chosen = sorted(set(pick.sample(keys, KEYS_PER_SAVE)))
            cpu_before = time.process_time()
            rows = await store.load_rows(chosen)
            loading += time.process_time() - cpu_before
            changes = [(rows[k].revision, k, rows[k]) for k in chosen]
            cpu_before, wall_before = time.process_time(), time.perf_counter()
            await store.save_rows(changes)
            cpu += time.process_time() - cpu_before
            wall += time.perf_counter() - wall_before
        saved = SAVES * KEYS_PER_SAVE
        return loading * 1e6 / saved, cpu * 1e6 / saved, wall * 1e6 / saved
    finally:
        for store in stores:
            await store.close()


def _remove(ledger: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{ledger}{suffix}").unlink(missing_ok=True)


async def measure(*, pages: Sequence[int], repeats: int
                  ) -> dict[int, tuple[float, float, float]]:
    """Median microseconds per key, by interval: CPU to load, CPU and wall time to save."""
    samples: dict[int, list[tuple[float, float, float]]] = {p: [] for p in pages}
    with tempfile.TemporaryDirectory() as tmp:
        seeded = Path(tmp) / "seeded.db"
        await _seed(seeded)
        for repeat in range(repeats):
            for p in pages:
                ledger = Path(tmp) / f"ledger-{p}-{repeat}.db"
                shutil.copy(seeded, ledger)
                samples[p].append(await _measure(ledger, pages=p, seed=repeat))
                _remove(ledger)
    return {p: (statistics.median(x[0] for x in s), statistics.median(x[1] for x in s),
                statistics.median(x[2] for x in s)) for p, s in samples.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wal_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, action="append",
                        help="a checkpoint interval to measure (default: 1000 and the store's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    pages = args.pages or [1000, WAL_CHECKPOINT_PAGES]
    for p, (load, cpu, wall) in asyncio.run(measure(pages=pages, repeats=args.repeats)).items():
        print(f"checkpoint every {p} pages: load {load:.1f} µs CPU per key; save {cpu:.1f} µs "
              f"CPU, {wall:.1f} µs wall per key "
              f"({KEYS_PER_SAVE} random keys of {CONTACTS * PREFERENCES} a save, {STORES} "
              f"stores taking turns; median of {args.repeats})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
