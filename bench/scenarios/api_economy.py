"""api-economy: what the sync costs in vendor API calls, from the simulators' own counters.

Per 1000 states written in a backfill, the calls made to the side written (writes, and all
calls), and per idle cycle (a sync with nothing changed on either side, after the backfill and
the cycle that reads its echoes back) the calls made to each side, against the number of feeds
read there. Uses the backfill runs of the same suite run when there are any, else runs one
backfill each way itself.
"""

from __future__ import annotations

from typing import Any

from bench.figures import median, read_calls, write_calls
from bench.scenarios.backfill import DIRECTIONS, one_backfill, previous_directions
from bench.suite import Suite

WRITES_PER_1000_TARGET = 2.0
# What each side's cycle has to look at for changes (the seeded account: 5 preferences, 2
# email-activated lists). Dynamics: change tracking of contacts, leads, accounts and
# subscription rows, the preference catalog, the email-activated lists, and the list members
# created since the last cycle (of every such list at once; the last two share one $batch).
# dotdigital: the preference tree (read once for both pollers), opt-ins-since per preference,
# suppressed-since (unsubscribes among them) and contacts modified since (v3).
FEEDS = {"dynamics": 4 + 1 + 1 + 1, "dotdigital": 1 + 5 + 1 + 1}


async def _runs(suite: Suite) -> dict[str, list[dict[str, Any]]]:
    """The backfill runs of this suite run; else of the backfill kept in latest.json at this
    size (call counts do not depend on the machine's load); else one each way, run now."""
    runs: dict[str, list[dict[str, Any]]] | None = suite.shared.get("backfill_runs")
    if runs and set(runs) == set(DIRECTIONS):
        return runs
    kept = previous_directions(suite)
    if set(kept) == set(DIRECTIONS):
        suite.say("api-economy: from the backfill runs kept in latest.json")
        return {name: way["runs"] for name, way in kept.items()}
    runs = {}
    for direction in DIRECTIONS:
        suite.say(f"api-economy: backfill {direction} ({suite.sizes.backfill_contacts:,} contacts)")
        async with suite.world() as world:
            runs[direction] = [await one_backfill(
                suite, world, direction, contacts=suite.sizes.backfill_contacts,
                label=f"api-economy-{direction}", idle=True)]
    return runs


async def run(suite: Suite) -> dict[str, Any]:
    runs = await _runs(suite)
    backfill: dict[str, Any] = {}
    for direction, (source, target) in DIRECTIONS.items():
        per_run = []
        for one in runs[direction]:
            thousands = one["states"] / 1000
            calls = one["calls"][target]
            per_run.append({
                "write_calls_per_1000": write_calls(calls) / thousands,
                "calls_per_1000": (write_calls(calls) + read_calls(calls)) / thousands,
                "source_calls_per_1000": sum(one["calls"][source].values()) / thousands,
            })
        last = runs[direction][-1]
        backfill[direction] = {
            "side_written": target,
            "write_calls_per_1000": round(median(r["write_calls_per_1000"] for r in per_run), 3),
            "calls_per_1000": round(median(r["calls_per_1000"] for r in per_run), 3),
            "source_side_calls_per_1000": round(
                median(r["source_calls_per_1000"] for r in per_run), 3),
            "calls": last["calls"],
            "met": median(r["write_calls_per_1000"] for r in per_run) <= WRITES_PER_1000_TARGET,
        }
    idle: dict[str, Any] = {}
    for direction in DIRECTIONS:
        cycles = next((r["idle_cycles"] for r in reversed(runs[direction]) if "idle_cycles" in r),
                      None)
        if not cycles:
            continue
        quiet = cycles[-1]
        idle[direction] = {
            side: {"calls": sum(quiet["calls"][side].values()), "feeds": FEEDS[side],
                   "calls_per_feed": round(sum(quiet["calls"][side].values()) / FEEDS[side], 2),
                   "by_route": quiet["calls"][side],
                   "met": sum(quiet["calls"][side].values()) <= FEEDS[side]}
            for side in ("dynamics", "dotdigital")}
        idle[direction]["summary"] = quiet["summary"]
    worst_writes = max(b["write_calls_per_1000"] for b in backfill.values())
    idle_met = all(v["met"] for cycle in idle.values() for k, v in cycle.items()
                   if k != "summary")
    per_feed = {side: max(cycle[side]["calls_per_feed"] for cycle in idle.values())
                for side in ("dynamics", "dotdigital")} if idle else {}
    return {
        "what": "vendor calls per 1000 changes on backfill (GET /_sim/stats), and per idle cycle",
        "target": f"at most {WRITES_PER_1000_TARGET:g} write calls per 1000 changes per side on "
                  "backfill; an idle cycle costs one read call per feed",
        "backfill": backfill,
        "idle_cycle": idle,
        "write_calls_per_1000": worst_writes,
        "idle_calls_per_feed": per_feed,
        "met": worst_writes <= WRITES_PER_1000_TARGET and idle_met and bool(idle),
        "measured": (f"{worst_writes:.2f} write calls per 1000 changes (worst side); idle cycle "
                     + ", ".join(f"{side} {v:.2f} calls per feed" for side, v in per_feed.items())),
    }
