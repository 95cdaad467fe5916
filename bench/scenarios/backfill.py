"""backfill: every preference state of one side copied to the other, through all four services.

Each way on a fresh pair of simulators: the source side is seeded with every state set
(``contacts`` x 5 preferences), the other side with the same people and no states. The time
is from the sync trigger until ``sync-now --wait`` would return (every change reconciled and
every write accepted and committed); afterwards the target side must hold every state. Seeding
and start-up are not timed.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import aio_pika

from bench.cpu import CpuWindow, headline, median_cpu
from bench.figures import batched_delta, call_delta, median, rounded, status_delta
from bench.harness import PREFERENCES, BenchError, World
from bench.suite import Suite
from bench.tracking import Progress

TARGET_S = 60.0
DIRECTIONS = {"dynamics-to-dotdigital": ("dynamics", "dotdigital"),
              "dotdigital-to-dynamics": ("dotdigital", "dynamics")}
IDLE_CYCLES = 2  # the first reads back the backfill's own writes (echoes); the second is idle


async def one_backfill(suite: Suite, world: World, direction: str, *, contacts: int,
                       label: str, idle: bool = False) -> dict[str, Any]:
    """Seed, start, time one backfill; with ``idle``, then the call counts of idle cycles."""
    source, target = DIRECTIONS[direction]
    seeded = await world.seed(records=contacts,
                              dynamics_states="all" if source == "dynamics" else "none",
                              dotdigital_states="all" if source == "dotdigital" else "none")
    expected = (seeded["dynamics"]["subscriptions"] if source == "dynamics"
                else seeded["dotdigital"]["states"])
    await world.start_all()
    before = {side: await world.stats(side) for side in ("dynamics", "dotdigital")}
    processes = {**world.services, **world.simulators}
    window = CpuWindow.open(processes, services=world.services)
    async with Progress(broker_url=world.config.broker.url, account=world.account) as progress:
        async with suite.profiled(world, label):
            record = await progress.sync(timeout_s=suite.sizes.timeout_s)
        seconds = record.seconds
        spent = window.close()
        after = {side: await world.stats(side) for side in ("dynamics", "dotdigital")}
        landed = (await world.dotdigital_states() if target == "dotdigital"
                  else await world.dynamics_subscriptions())
        summary = record.summary()
        if summary["failed"] or landed != expected:
            raise BenchError(f"backfill {direction} incomplete: {landed} of {expected} states "
                             f"in {target}; {summary}")
        result: dict[str, Any] = {
            "states": expected,
            "seconds": round(seconds, 3),
            "states_per_s": round(expected / seconds, 1),
            "timeline_s": record.timeline(),
            "cpu_s": spent.cpu_s,
            "cpu": spent.per_state(states=expected, simulators=world.simulators),
            "peak_rss_mb": {n: round(m.get("peak_rss_mb", 0.0), 1)
                            for n, m in world.memory().items()},
            "calls": {side: call_delta(before[side], after[side]) for side in before},
            "operations_in_batches": {side: batched_delta(before[side], after[side])
                                      for side in before},
            "statuses": {side: status_delta(before[side], after[side]) for side in before},
        }
        if idle:
            cycles = []
            for _ in range(IDLE_CYCLES):
                start = {side: await world.stats(side) for side in ("dynamics", "dotdigital")}
                cycle = await progress.sync(timeout_s=suite.sizes.timeout_s)
                end = {side: await world.stats(side) for side in ("dynamics", "dotdigital")}
                cycles.append({"summary": cycle.summary(), "seconds": round(cycle.seconds, 3),
                               "calls": {s: call_delta(start[s], end[s]) for s in start}})
            result["idle_cycles"] = cycles
    return result


async def _drain_check(world: World) -> None:
    connection = await aio_pika.connect(world.config.broker.url)
    async with connection:
        depths = await world.queue_depths(connection)
    if any(depths.values()):
        raise BenchError(f"messages left in the queues after the run: {depths}")


def previous_directions(suite: Suite) -> dict[str, dict[str, Any]]:
    """The directions an earlier suite run measured at this size (kept in latest.json)."""
    entry = suite.previous.get("backfill") or {}
    if entry.get("size") != suite.size_name:
        return {}
    return {name: way for name, way in (entry.get("directions") or {}).items()
            if name in DIRECTIONS and way.get("runs")}


async def run(suite: Suite) -> dict[str, Any]:
    sizes = suite.sizes
    contacts = sizes.backfill_contacts
    ceiling = suite.ceiling.get("states_per_s")
    # Each direction keeps the ceiling of its own suite run: one may be measured now and the
    # other kept from an earlier run (``--direction``), each read against its own ceiling.
    ways: dict[str, dict[str, Any]] = previous_directions(suite)
    for direction in suite.directions or tuple(DIRECTIONS):

        async def one(attempt: int, direction: str = direction) -> dict[str, Any]:
            async with suite.world() as world:
                started = time.monotonic()
                result = await one_backfill(suite, world, direction, contacts=contacts,
                                            label=f"backfill-{direction}-{attempt}",
                                            idle=attempt == sizes.repeats)
                await _drain_check(world)
                suite.say(f"  {result['seconds']:.1f} s, {result['states_per_s']:,.0f} "
                          f"states/s (with set-up {time.monotonic() - started:.0f} s)")
            return result

        repeats = await suite.repeat(f"backfill {direction}", f"{contacts:,} contacts", one)
        runs = repeats.runs
        seconds = median(r["seconds"] for r in runs)
        rate = median(r["states_per_s"] for r in runs)
        middle = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        ways[direction] = {
            "states": runs[0]["states"],
            "seconds": round(seconds, 3),
            "seconds_each": [r["seconds"] for r in runs],
            "states_per_s": round(rate, 1),
            "ratio_to_ceiling": rounded(rate / ceiling if ceiling else None, 4),
            "ceiling_states_per_s": ceiling,
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "met": seconds < TARGET_S,
            "timeline_s": middle["timeline_s"],
            "cpu_s": middle["cpu_s"],
            "cpu": median_cpu([r["cpu"] for r in runs]),
            "peak_rss_mb": {name: max(r["peak_rss_mb"].get(name, 0.0) for r in runs)
                            for name in runs[0]["peak_rss_mb"]},
            "runs": runs,
            "failed_runs": repeats.failed,
        }
    suite.shared["backfill_runs"] = {name: way["runs"] for name, way in ways.items()}
    ordered = {name: ways[name] for name in DIRECTIONS if name in ways}
    return {
        "what": f"{contacts:,} contacts x {PREFERENCES} preferences, each way, all four services",
        "target": f"under {TARGET_S:.0f} s each way",
        "target_s": TARGET_S,
        "repeats": sizes.repeats,
        "directions": ordered,
        "seconds": max(w["seconds"] for w in ordered.values()),
        "states_per_s": min(w["states_per_s"] for w in ordered.values()),
        "ratio_to_ceiling": min((w["ratio_to_ceiling"] or 0.0) for w in ordered.values()),
        "met": len(ordered) == len(DIRECTIONS) and all(w["met"] for w in ordered.values()),
        "cpu": {name: w["cpu"] for name, w in ordered.items() if "cpu" in w},
        "simulators_over_10pct": any(w["cpu"]["simulators_over_10pct"]
                                     for w in ordered.values() if "cpu" in w),
        "measured": "; ".join(
            f"{name}: {w['seconds']:.1f} s, {w['states_per_s']:,.0f} states/s, "
            f"{(w['ratio_to_ceiling'] or 0) * 100:.2f}% of ceiling"
            + (f", {headline(w['cpu'])}" if "cpu" in w else "")
            for name, w in ordered.items()),
    }
