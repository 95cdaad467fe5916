"""CPU cost of the writer's own pipeline per write, the vendor left out.

    .venv/bin/python -m bench.writer_cost [--rounds N] [--emails N]

Each round registers new keys in the ledger (400 emails x 5 preferences by default: the
reconciler's decisions on a Dynamics change, saved before anything is timed), then hands their
dotdigital write commands to :meth:`services.writer.pipeline.Writer.handle_round` in shard
batches, as one write round. The sink takes every write at once, with no vendor and no socket,
so what is timed is the pipeline's own work (deduplicating, loading, deciding, beginning,
committing, reporting) and the ledger's, in process CPU time (SQLite's thread included). The
first round warms up and is not counted; the figure is the median of the others, in
microseconds of CPU per write. The ledger is SQLite in a temporary directory.

The code measured is what ``PYTHONPATH`` makes importable. To set a change against another
checkout on a busy machine, ``--compare DIR`` alternates runs of the two (``--runs`` each) and
prints both medians with their ratio::

    .venv/bin/python bench/writer_cost.py --compare /work/main
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

EMAILS = 400
PREFERENCES = 5
SHARDS = 4
ACCOUNT = "acme"


@dataclass(frozen=True)
class _Message:
    message_id: str


async def _measure(rounds: int, emails: int) -> float:
    # imported here: PYTHONPATH picks the code measured (--compare)
    from common import domain
    from common.domain import ContactState, Observation, PreferenceKey
    from common.domain.kernel_writes import writer_should_apply_row
    from common.domain.rows import CommandRow, KeyTuple, StateRow
    from common.messaging.abc import Delivery
    from common.messaging.amqp import DeadLetterer
    from common.messaging.envelope import Envelope, WriteCommand
    from common.messaging.memory import MemoryBroker
    from common.messaging.topology import Topology, shard_of
    from common.store import open_store
    from services.writer.pipeline import Writer
    from services.writer.sink import Commands, SinkReads, WriteOutcome

    class Batch:
        begins_during_read = True  # as dotdigital's

        def __init__(self, outcome: WriteOutcome) -> None:
            self._outcome = outcome

        reads = SinkReads()

        async def read(self, *, states: Mapping[KeyTuple, StateRow],
                       covered: set[PreferenceKey], snapshot: Any) -> None:
            return None

        def takes(self, key: PreferenceKey) -> bool:
            return True

        def should_write(self, key: PreferenceKey, state: StateRow,
                         command: CommandRow) -> bool:
            return writer_should_apply_row(state, command, suppressed=False)

        async def write(self, todo: Commands, *, started: datetime,
                        contacts: Mapping[str, ContactState]) -> None:
            ended = datetime.now(UTC)
            for key in todo:
                self._outcome.written[key].append((None, started, ended))

    class Sink:
        side = "dotdigital"
        dependency = "dotdigital"

        async def open(self, commands: Commands, outcome: WriteOutcome) -> Batch:
            return Batch(outcome)

    broker = MemoryBroker(Topology(accounts=[ACCOUNT], shards=SHARDS))
    figures: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        async with open_store(f"sqlite:///{Path(tmp) / 'ledger.db'}") as store:
            writer = Writer(account=ACCOUNT, sink=cast(Any, Sink()), store=store,
                            publisher=broker, shards=SHARDS,
                            dead_letters=DeadLetterer(publisher=broker, service="writer"))
            for number in range(rounds + 1):
                now = datetime.now(UTC) - timedelta(seconds=1)
                now = now.replace(microsecond=now.microsecond // 1000 * 1000)
                changes: list[Any] = []
                by_shard: dict[int, list[WriteCommand]] = {}
                for e in range(emails):
                    email = f"r{number}.person{e}@example.com"
                    for p in range(PREFERENCES):
                        key = PreferenceKey(account=ACCOUNT, email=email, preference_id=1000 + p)
                        change_id = f"dyn:{number}:{e}:{p}"
                        decision = domain.reconcile(None, Observation(
                            key=key, side="dynamics", opted_in=bool((e + p) % 2),
                            origin_time=now, version=1, change_id=change_id))
                        changes.append((None, decision.state, None))
                        by_shard.setdefault(shard_of(email, SHARDS), []).append(WriteCommand(
                            email=email, preference_id=1000 + p, side="dotdigital",
                            opted_in=bool((e + p) % 2), origin_time=now,
                            origin_side="dynamics", change_id=change_id))
                await store.save(changes)
                batches = [[Delivery(envelope=Envelope(
                    type="write-commands", account=ACCOUNT, source="reconciler",
                    change_id=f"m{number}:{shard}", origin_time=now, changes=tuple(commands)),
                    message=cast(Any, _Message(f"m{number}:{shard}")), queue=f"q{shard}")]
                    for shard, commands in sorted(by_shard.items())]
                began = time.process_time()
                handled = await writer.handle_round(batches)
                spent = time.process_time() - began
                written = sum(h.counts["written"] for h in handled)
                if written != emails * PREFERENCES:
                    raise AssertionError(f"{written} writes of {emails * PREFERENCES}")
                if number:
                    figures.append(spent / written * 1e6)
    return statistics.median(figures)


def _compare(other: Path, runs: int, rounds: int, emails: int) -> None:
    here = Path(__file__).resolve().parents[1]
    found: dict[str, list[float]] = {"base": [], "this": []}
    for _ in range(runs):
        for name, root in (("base", other), ("this", here)):
            env = {**os.environ, "PYTHONPATH": str(root)}
            out = subprocess.run([sys.executable, __file__, "--rounds", str(rounds),
                                  "--emails", str(emails)], env=env, cwd=root,
                                 capture_output=True, text=True, check=True)
            found[name].append(json.loads(out.stdout)["us_per_write"])
    base, this = statistics.median(found["base"]), statistics.median(found["this"])
    print(f"base {other}: {base:.1f} µs/write {[round(v, 1) for v in found['base']]}")
    print(f"this {here}: {this:.1f} µs/write {[round(v, 1) for v in found['this']]}")
    print(f"ratio this/base: {this / base:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--emails", type=int, default=EMAILS)
    parser.add_argument("--compare", type=Path, help="a checkout to measure against")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if args.compare is not None:
        _compare(args.compare, args.runs, args.rounds, args.emails)
        return
    print(json.dumps({"us_per_write": asyncio.run(_measure(args.rounds, args.emails))}))


if __name__ == "__main__":
    main()
