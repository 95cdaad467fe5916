"""``prefsync bench [SCENARIO ...]`` / ``python -m bench``: run the suite, write the results."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import results
from bench.sizes import SIZES, with_repeats
from services.cli.progress import Meter

SCENARIOS = ("backfill", "steady", "api-economy", "rate-limited", "low-tier", "memory", "scale")
# Run on its own (never part of "all"): faults injected, results in chaos.json (bench/chaos.py).
CHAOS = "chaos"
# no user in the URL: the client logs in as RabbitMQ's default (guest, let in from localhost only)
DEFAULT_BROKER = "amqp://127.0.0.1:5672/"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"scenarios to run (default: all): {', '.join(SCENARIOS)}; or "
                             f"'{CHAOS}' alone: the chaos suite (results in chaos.json)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full",
                        help="full: the sizes the targets are set for (default); medium "
                             "(a tenth) and small: runs while working; smoke: tiny, for "
                             "correctness only")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per scenario, reported as medians (default: by size)")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="sample every service and simulator with py-spy into DIR")
    parser.add_argument("--results", type=Path, default=results.RESULTS_DIR, metavar="DIR",
                        help="where latest.json and latest.md go (default bench/results)")
    parser.add_argument("--broker-url", default=os.environ.get("PREFSYNC_BROKER_URL",
                                                               DEFAULT_BROKER))
    parser.add_argument("--keep", action="store_true",
                        help="keep each world's directory (config, ledger, service logs)")
    parser.add_argument("--direction", action="append", default=[],
                        choices=("dynamics-to-dotdigital", "dotdigital-to-dynamics"),
                        help="backfill: only this way (repeatable); the other is kept from "
                             "latest.json, measured at the same size; low-tier: its first "
                             "sync only this way")
    parser.add_argument("--seed", type=int, default=1,
                        help="chaos: the seed of the workload and fault schedule")
    parser.add_argument("--only", default=None, metavar="TEXT",
                        help="chaos: only the cases whose name contains TEXT")
    parser.add_argument("--merge", action="append", type=Path, default=[], metavar="DIR",
                        help="chaos: instead of running, merge the chaos.json of runs made "
                             "apart (repeatable) into --results")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if CHAOS in args.scenarios:
        if len(args.scenarios) > 1:
            print(f"'{CHAOS}' runs on its own", file=sys.stderr)
            return 2
        from bench.chaos import chosen_cases, markdown, merge, run_chaos

        if args.merge:
            print(markdown(merge(args.merge, args.results)))
            return 0
        try:
            chosen_cases(args.size, seed=args.seed, only=args.only)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        return asyncio.run(run_chaos(size=args.size, seed=args.seed, results_dir=args.results,
                                     keep=args.keep, only=args.only))
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}",
              file=sys.stderr)
        return 2
    chosen = [s for s in SCENARIOS if s in args.scenarios] or list(SCENARIOS)
    return asyncio.run(run_suite(chosen, size=args.size, repeats=args.repeats,
                                 profile_dir=args.profile, results_dir=args.results,
                                 broker_url=args.broker_url, keep=args.keep,
                                 directions=tuple(args.direction)))


async def run_suite(chosen: Sequence[str], *, size: str, repeats: int | None,
                    profile_dir: Path | None, results_dir: Path, broker_url: str,
                    keep: bool = False, directions: tuple[str, ...] = ()) -> int:
    from bench.ceiling import measure_ceiling
    from bench.scenarios import REGISTRY
    from bench.suite import Suite, machine

    sizes = with_repeats(SIZES[size], repeats)
    previous = results.load(results_dir / "latest.json")
    suite = Suite(broker_url=broker_url, size_name=size, sizes=sizes, profile_dir=profile_dir,
                  keep=keep, previous=previous.get("scenarios") or {}, directions=directions)
    # the suite's progress: the ceiling, then each scenario (on a terminal only)
    with Meter() as meter:
        steps = len(chosen) + 1
        meter.update("bench", completed=0, total=steps, detail="the broker's ceiling")
        about = await machine(broker_url)
        suite.say(f"machine: {about['cpus']} x {about['cpu']}, load {about['load_average_at_start']}")
        messages = max(40, sizes.backfill_contacts * 5 // 500)
        ceilings = []
        for _ in range(sizes.repeats):
            ceilings.append(await measure_ceiling(broker_url=broker_url, messages=messages))
        ceilings.sort(key=lambda c: c["states_per_s"])
        suite.ceiling = {**ceilings[len(ceilings) // 2],
                         "states_per_s_each": [c["states_per_s"] for c in ceilings]}
        suite.say(f"ceiling: {suite.ceiling['states_per_s']:,} states/s")
        meter.update("bench", completed=1, detail=chosen[0])
        measured: dict[str, Any] = {}
        failed = False
        for name in chosen:
            started = datetime.now(UTC)
            try:
                entry = await REGISTRY[name](suite)
            except Exception as exc:  # one scenario failing must not lose the others' figures
                failed = True
                traceback.print_exc()
                entry = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            if entry.get("failed_runs"):
                # the figures of the runs that finished are kept; the exit status still tells
                failed = True
                entry["measured"] = (f"{entry.get('measured', '')} ({len(entry['failed_runs'])} "
                                     "run(s) failed, left out: see failed_runs)")
            entry.update({"size": size, "measured_at": started.isoformat(timespec="seconds"),
                          "ceiling_states_per_s": suite.ceiling["states_per_s"]})
            measured[name] = entry
            suite.say(f"{name}: {entry.get('measured') or entry.get('error')}")
            done = chosen.index(name) + 1
            meter.update("bench", completed=done + 1,
                         detail=chosen[done] if done < len(chosen) else "done")
            merged = results.merge(results.load(results_dir / "latest.json"), machine=about,
                                   ceiling=suite.ceiling, scenarios=measured)
            json_path, md_path = results.write(merged, results_dir)
    print(results.markdown(merged))
    print(f"results: {json_path} and {md_path}")
    return 1 if failed else 0
