"""CPU cost of the message envelope per change: ``python -m bench.envelope_cost``.

Encodes and decodes two messages of 500 changes each, the size the services publish
(:data:`common.messaging.publishing.CHUNK`):

1. **preference-changes** as the Dynamics poller publishes them (100 emails x 5 preferences,
   whole-second times, a row version each, a change id each);
2. **write-commands** as the reconciler publishes them to the dotdigital writer (some
   ``covered``).

Each is measured in every schema version the code under test encodes (1: a list of change
objects; 2: columns), in the same run: CPU time (the machine is shared), ``--runs`` runs of
``--loops`` calls each after a warm-up, the median run reported in CPU microseconds per change,
with the body's bytes per change. The file uses only the envelope's public API, so it measures
an older checkout too: run it with ``PYTHONPATH`` set to that one (a build without version 2
reports version 1 alone).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from common.messaging import envelope as codec
from common.messaging.envelope import Envelope, PreferenceChange, WriteCommand, decode, encode

ACCOUNT = "bench-envelope"
CHANGES = 500
PREFERENCES = 5
BASE = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def preference_changes() -> Envelope:
    changes = tuple(
        PreferenceChange(email=f"person.{i // PREFERENCES}@example.com",
                         preference_id=1001 + i % PREFERENCES, opted_in=i % 4 != 0,
                         origin_time=BASE + timedelta(seconds=i), version=6_000 + i,
                         change_id=f"dyn:{i}")
        for i in range(CHANGES))
    return Envelope(type="preference-changes", account=ACCOUNT, source="dynamics",
                    change_id="bench-changes", origin_time=BASE + timedelta(seconds=CHANGES),
                    changes=changes, run_id="bench")


def write_commands() -> Envelope:
    changes = tuple(
        WriteCommand(email=f"person.{i // PREFERENCES}@example.com",
                     preference_id=1001 + i % PREFERENCES, side="dotdigital",
                     opted_in=i % 3 != 0, origin_time=BASE + timedelta(seconds=i),
                     origin_side="dynamics", change_id=f"dyn:{i}", covered=i % 2 == 0)
        for i in range(CHANGES))
    return Envelope(type="write-commands", account=ACCOUNT, source="reconciler",
                    change_id="bench-writes", origin_time=BASE + timedelta(seconds=CHANGES),
                    changes=changes, run_id="bench")


def versions() -> tuple[int, ...]:
    """The schema versions the code under test both encodes and decodes."""
    readable: tuple[int, ...] = getattr(codec, "READ_VERSIONS", (1,))
    return readable


def _cpu_per_call(work: Callable[[], Any], *, runs: int, loops: int) -> float:
    """Median CPU seconds of one call of ``work`` (``runs`` runs of ``loops`` calls)."""
    work()
    times = []
    for _ in range(runs):
        start = time.process_time()
        for _ in range(loops):
            work()
        times.append((time.process_time() - start) / loops)
    return statistics.median(times)


def measure(*, runs: int, loops: int) -> list[dict[str, Any]]:
    rows = []
    for message in (preference_changes(), write_commands()):
        for version in versions():
            envelope = replace(message, version=version)
            body = encode(envelope)
            decoded = decode(body)
            assert decoded.changes == message.changes, "the round trip changed the changes"
            encoding = _cpu_per_call(partial(encode, envelope), runs=runs, loops=loops)
            decoding = _cpu_per_call(partial(decode, body), runs=runs, loops=loops)
            count = len(message.changes)
            rows.append({"message": message.type, "version": version,
                         "encode_us_per_change": encoding / count * 1e6,
                         "decode_us_per_change": decoding / count * 1e6,
                         "bytes_per_change": len(body) / count})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.envelope_cost", description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="timed runs; the median is printed")
    parser.add_argument("--loops", type=int, default=20, help="calls per timed run")
    args = parser.parse_args(argv)
    rows = measure(runs=args.runs, loops=args.loops)
    print(f"{'message':<20} {'v':>2} {'encode us/chg':>14} {'decode us/chg':>14} {'bytes/chg':>10}")
    for row in rows:
        print(f"{row['message']:<20} {row['version']:>2} {row['encode_us_per_change']:>14.2f} "
              f"{row['decode_us_per_change']:>14.2f} {row['bytes_per_change']:>10.1f}")
    by_key = {(r["message"], r["version"]): r for r in rows}
    for message in dict.fromkeys(r["message"] for r in rows):
        old, new = by_key.get((message, 1)), by_key.get((message, 2))
        if old and new:
            ratios = {part: new[f"{part}_us_per_change"] / old[f"{part}_us_per_change"]
                      for part in ("encode", "decode")}
            print(f"{message}: v2/v1 encode {ratios['encode']:.2f}x, "
                  f"decode {ratios['decode']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
