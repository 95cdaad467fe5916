"""rate-limited: a backfill into dotdigital at the lowest documented call tier.

dotdigital allows 35 calls a minute (the simulator's per-account limit, counted in fixed
one-minute windows, and the account's ``calls_per_minute``), of which prefsync spends the budget
less its reserve for the customer's other integrations (``budget_reserve``, 20% by default: 28);
Dataverse keeps its documented service protection limits (6000 requests and 1,200,000 ms of
execution per 300 s, 52 at once: the simulator's defaults). The least time that budget allows
for ``N`` dotdigital calls is ``60 s x (ceil(N / 28) - 1)`` from the first call (every window
but the last spent in full), and never less than the same backfill takes without a limit
(measured first, in the same run).
"""

from __future__ import annotations

import math
from typing import Any

from bench.figures import median, rounded
from bench.harness import WorldOptions
from bench.scenarios.backfill import one_backfill
from bench.suite import Suite
from common.vendors.budget import Budget

CALLS_PER_MINUTE = 35
WITHIN = 0.10
DIRECTION = "dynamics-to-dotdigital"


def budget_seconds(calls: int, per_minute: int = CALLS_PER_MINUTE) -> float:
    """The least time ``calls`` take at ``per_minute`` (spent whole, window after window)."""
    return 60.0 * max(0, math.ceil(calls / per_minute) - 1)


async def run(suite: Suite) -> dict[str, Any]:
    contacts = suite.sizes.rate_limited_contacts

    async def one(attempt: int) -> dict[str, Any]:
        async with suite.world() as world:
            free = await one_backfill(suite, world, DIRECTION, contacts=contacts,
                                      label=f"rate-free-{attempt}")
        suite.say(f"  without a limit {free['seconds']:.1f} s; now at {CALLS_PER_MINUTE} "
                  f"calls/min")
        async with suite.world(WorldOptions(calls_per_minute=CALLS_PER_MINUTE)) as world:
            await world.limits("dotdigital", {"calls_per_minute": CALLS_PER_MINUTE})
            limited = await one_backfill(suite, world, DIRECTION, contacts=contacts,
                                         label=f"rate-limited-{attempt}")
            spendable = Budget(calls=CALLS_PER_MINUTE, window_s=60.0, reserve=world.config
                               .accounts[0].dotdigital.budget_reserve).spendable
        statuses = limited["statuses"]["dotdigital"]
        throttled = int(statuses.get("429", 0))
        calls = sum(limited["calls"]["dotdigital"].values()) - throttled
        least = max(budget_seconds(calls, spendable), free["seconds"])
        result = {
            "seconds": limited["seconds"],
            "unlimited_seconds": free["seconds"],
            "dotdigital_calls": calls,
            "dotdigital_429": throttled,
            "dynamics_429": int(limited["statuses"]["dynamics"].get("429", 0)),
            "least_seconds": round(least, 3),
            "spendable_per_minute": spendable,
            "over_least": round(limited["seconds"] / least - 1, 4) if least else None,
            "calls": limited["calls"]["dotdigital"],
        }
        suite.say(f"  {result['seconds']:.1f} s for {calls} calls (least {least:.0f} s), "
                  f"{throttled} x 429")
        return result

    repeats = await suite.repeat("rate-limited", f"{contacts:,} contacts into dotdigital, "
                                 "first without a limit", one)
    results = repeats.runs
    over = median(r["over_least"] for r in results if r["over_least"] is not None)
    throttled = max(r["dotdigital_429"] + r["dynamics_429"] for r in results)
    seconds = median(r["seconds"] for r in results)
    least = median(r["least_seconds"] for r in results)
    return {
        "what": f"{contacts:,} contacts x 5 preferences into dotdigital at {CALLS_PER_MINUTE} "
                "calls/min, Dataverse at its documented limits",
        "target": f"no 429 after the first; within {WITHIN:.0%} of the least time the call "
                  "budget less its reserve allows",
        "seconds": round(seconds, 3),
        "least_seconds": round(least, 3),
        "over_least": rounded(over, 4),
        "max_429": throttled,
        "runs": results,
        "failed_runs": repeats.failed,
        "met": throttled <= 1 and over <= WITHIN,
        "measured": f"{seconds:.0f} s against a least of {least:.0f} s "
                    f"({over:+.0%}), at most {throttled} x 429",
    }
