"""low-tier: a real account's budget, dotdigital at its Low tier (35 calls a minute).

dotdigital allows the account 35 calls a minute (the simulator's limit, and the account's
``calls_per_minute``, of which prefsync spends the budget less its reserve: 28); Dataverse keeps
its documented service protection limits (the simulator's defaults). Three measurements:

1. **Idle cycle.** An account of ``low_tier_contacts`` people and 3 preferences (the sample
   states on both sides, dated an hour back), synced until in step without a limit, then put
   at the Low tier (set-up, not measured). A sync then that finds nothing changed must cost at
   most one call per feed: on each side 6 (dotdigital: the preference tree, the opt-ins since
   the last read of each of the 3 preferences, suppressed-since, contacts modified since;
   Dynamics: change tracking of contacts, leads, accounts and subscription rows, the
   preference catalog, and one ``$batch`` of the email-activated lists and their new members).
   Counted per side and per endpoint from the simulators' ``GET /_sim/stats``.
2. **A small sync now.** After the account rested a whole budget window (nothing spent in the
   last minute), 10 people edit all 3 preferences in Dynamics and 10 others in dotdigital; the
   sync triggered then (as ``sync-now --wait``: until every change is reconciled and written)
   must take under 10 s and at most 10 dotdigital calls. Where its time goes: the run's stages
   (each poller's read done, reconciled, written) and, sampled every :data:`TRACE_EVERY_S`,
   when each side's calls were made.
3. **First sync.** ``low_tier_first_sync_contacts`` x 5 preferences, each way (as ``backfill``:
   the source side holds every state, the other side the same people and none), under 3
   minutes each way. One run each way (minutes long at this budget); ``--direction``: only
   that way (the target then is not met: the other way was not measured).

The idle cycle and the small sync are repeated ``repeats`` times in the same account (each
small sync with other people, after an idle cycle and a rest); figures are medians.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from bench.figures import batched_delta, call_delta, median, status_delta
from bench.harness import SEED, BenchError, World, WorldOptions
from bench.scenarios.backfill import DIRECTIONS, one_backfill
from bench.suite import Suite
from bench.tracking import Progress, RunRecord
from services.simulators import seeding

CALLS_PER_MINUTE = 35
PREFERENCES = 3
SIDES = ("dynamics", "dotdigital")
# one call per feed when nothing changed (see the module docstring)
IDLE_CALLS_TARGET = {"dynamics": 6, "dotdigital": 6}
EDITED_PER_SIDE = 10
SYNC_NOW_TARGET_S = 10.0
SYNC_NOW_DOTDIGITAL_CALLS = 10
FIRST_SYNC_TARGET_S = 180.0
TRACE_EVERY_S = 0.1
HISTORY_AGO_S = 3600.0


def options() -> WorldOptions:
    return WorldOptions(calls_per_minute=CALLS_PER_MINUTE)


async def low_tier_world(world: World) -> None:
    """The simulator's dotdigital account at the Low tier (Dataverse: its documented limits,
    the simulator's defaults)."""
    await world.limits("dotdigital", {"calls_per_minute": CALLS_PER_MINUTE})


def in_step_people(contacts: int, count: int, *, skip: int = 0) -> list[str]:
    """``count`` emails (after the first ``skip`` such) whose seeded sample states are set and
    alike on both sides for every preference: after the set-up sync they hold those values, so
    flipping them is a change on either side."""
    leaves = [n.id for n in seeding.leaf_preferences(PREFERENCES, SEED)]
    found: list[str] = []
    for person in seeding.people(contacts, SEED):
        states = [(seeding.initial_state(SEED, "dynamics", person.email, pid),
                   seeding.initial_state(SEED, "dotdigital", person.email, pid))
                  for pid in leaves]
        if all(d is not None and d == e for d, e in states):
            found.append(person.email)
            if len(found) == skip + count:
                return found[skip:]
    raise BenchError(f"fewer than {skip + count} people in step among {contacts:,}")


async def flip_all(world: World, side: str, emails: list[str]) -> int:
    """Every preference of each of ``emails`` set, on ``side``, to the opposite of its seeded
    (and synced) value; returns the number of states changed."""
    leaves = [n.id for n in seeding.leaf_preferences(PREFERENCES, SEED)]
    edits = [world.edit(side, email, pid,
                        not seeding.initial_state(SEED, side, email, pid))
             for email in emails for pid in leaves]
    await asyncio.gather(*edits)
    return len(edits)


async def all_stats(world: World) -> dict[str, dict[str, Any]]:
    return dict(zip(SIDES, await asyncio.gather(*(world.stats(s) for s in SIDES)), strict=True))


@dataclass
class CallTrace:
    """When each side's calls were made, sampled from ``GET /_sim/stats`` every
    :data:`TRACE_EVERY_S`: ``(seconds from start, side, route, calls)``."""

    world: World
    last: Mapping[str, dict[str, Any]]
    started: float = field(default_factory=time.monotonic)
    points: list[tuple[float, str, str, int]] = field(default_factory=list)

    async def sample(self) -> None:
        """The calls made since the last sample, as of now."""
        now = await all_stats(self.world)
        at = round(time.monotonic() - self.started, 2)
        for side in SIDES:
            for route, calls in sorted(call_delta(self.last[side], now[side]).items()):
                self.points.append((at, side, route, calls))
        self.last = now

    async def follow(self) -> None:
        while True:
            await asyncio.sleep(TRACE_EVERY_S)
            await self.sample()

    def per_bucket(self, side: str, *, bucket_s: float) -> list[dict[str, int]]:
        """One side's calls in each ``bucket_s`` from the start, by route (a sample's calls
        count in the bucket it was taken in)."""
        buckets: list[dict[str, int]] = []
        for at, of, route, calls in self.points:
            if of != side:
                continue
            index = int(at // bucket_s)
            while len(buckets) <= index:
                buckets.append({})
            buckets[index][route] = buckets[index].get(route, 0) + calls
        return buckets

    def lines(self) -> list[str]:
        """The trace as lines ``"t=1.2 dotdigital GET /v2/... x3"``."""
        return [f"t={at:.1f} {side} {route} x{calls}" for at, side, route, calls in self.points]


@contextlib.asynccontextmanager
async def traced(world: World, before: Mapping[str, dict[str, Any]]
                 ) -> AsyncIterator[CallTrace]:
    trace = CallTrace(world=world, last=before)
    task = asyncio.create_task(trace.follow())
    try:
        yield trace
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await trace.sample()  # the calls made since the last sample


def calls_of(before: Mapping[str, dict[str, Any]],
             after: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """Per side: calls per endpoint, operations inside ``$batch`` requests, statuses."""
    return {side: {"calls": sum(call_delta(before[side], after[side]).values()),
                   "by_route": call_delta(before[side], after[side]),
                   "in_batches": batched_delta(before[side], after[side]),
                   "statuses": status_delta(before[side], after[side])}
            for side in SIDES}


async def measured_sync(world: World, progress: Progress, *, timeout_s: float,
                        trace: bool = False) -> tuple[RunRecord, dict[str, Any], list[str]]:
    """One run from trigger to finished: its record, the calls it made, and (``trace``) when."""
    before = await all_stats(world)
    if trace:
        async with traced(world, before) as tracer:
            record = await progress.sync(timeout_s=timeout_s)
        lines = tracer.lines()
    else:
        record = await progress.sync(timeout_s=timeout_s)
        lines = []
    after = await all_stats(world)
    if record.summary()["failed"]:
        raise BenchError(f"low-tier: a run failed: {record.summary()}")
    return record, calls_of(before, after), lines


async def one_account(suite: Suite, world: World
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Set-up, then per repeat an idle cycle and, after a rest, the small sync."""
    sizes = suite.sizes
    contacts = sizes.low_tier_contacts
    # the account's history is older than the feeds' overlap, as a real account's mostly is
    await asyncio.gather(*(world.set_clock(side, {"offset_s": -HISTORY_AGO_S}) for side in SIDES))
    await world.seed(records=contacts, preferences=PREFERENCES)
    await asyncio.gather(*(world.set_clock(side, {}) for side in SIDES))
    await world.start_all()
    rounds: list[dict[str, Any]] = []
    async with Progress(broker_url=world.config.broker.url, account=world.account) as progress:
        setup = []

        async def setup_sync() -> None:
            record, calls, _ = await measured_sync(world, progress, timeout_s=sizes.timeout_s)
            setup.append({"seconds": round(record.seconds, 3), "summary": record.summary(),
                          "dotdigital_calls": calls["dotdigital"]["calls"],
                          "dynamics_calls": calls["dynamics"]["calls"],
                          "calls_per_minute": world.options.calls_per_minute})

        # In step, then the echoes of that read back: set-up, without a limit (at the Low
        # tier it would take minutes at full size, and it is not what is measured) ...
        for _ in range(2):
            await setup_sync()
        # ... then the account at the Low tier, its services started again, and one cycle
        # of theirs (what they keep in memory, e.g. the clock's estimate, is rebuilt).
        await world.set_calls_per_minute(CALLS_PER_MINUTE)
        await low_tier_world(world)
        await world.start_all()
        await setup_sync()
        suite.say("  set-up: " + ", ".join(f"{s['seconds']:.1f} s ({s['dotdigital_calls']} "
                                           f"dotdigital calls)" for s in setup))
        for attempt in range(sizes.repeats):
            record, idle, _ = await measured_sync(world, progress, timeout_s=sizes.timeout_s)
            read = record.summary()["read"]
            suite.say(f"  idle cycle: dynamics {idle['dynamics']['calls']} calls, dotdigital "
                      f"{idle['dotdigital']['calls']} calls, read {read}, "
                      f"{record.seconds:.1f} s")
            await asyncio.sleep(sizes.low_tier_rest_s)
            dynamics_people = in_step_people(contacts, EDITED_PER_SIDE,
                                             skip=2 * EDITED_PER_SIDE * attempt)
            dotdigital_people = in_step_people(contacts, EDITED_PER_SIDE,
                                               skip=(2 * attempt + 1) * EDITED_PER_SIDE)
            edited = (await flip_all(world, "dynamics", dynamics_people)
                      + await flip_all(world, "dotdigital", dotdigital_people))
            small, calls, trace = await measured_sync(world, progress,
                                                      timeout_s=sizes.timeout_s, trace=True)
            summary = small.summary()
            applied = summary["applied_to_dotdigital"] + summary["applied_to_dynamics"]
            if applied != edited:
                raise BenchError(f"low-tier: {edited} states edited, {applied} written: "
                                 f"{summary}")
            suite.say(f"  sync now: {small.seconds:.1f} s, {calls['dotdigital']['calls']} "
                      f"dotdigital calls, {calls['dynamics']['calls']} Dynamics calls; "
                      f"{small.timeline()}")
            echo, echo_calls, _ = await measured_sync(world, progress,
                                                      timeout_s=sizes.timeout_s)
            rounds.append({
                "idle": {"seconds": round(record.seconds, 3), "read": read, **idle},
                "sync_now": {"seconds": round(small.seconds, 3), "states_edited": edited,
                             "summary": summary, "timeline_s": small.timeline(),
                             "call_trace": trace, **calls},
                "echo_cycle": {"seconds": round(echo.seconds, 3), "read": echo.summary()["read"],
                               "dotdigital_calls": echo_calls["dotdigital"]["calls"],
                               "dynamics_calls": echo_calls["dynamics"]["calls"]},
            })
    return setup, rounds


async def first_sync(suite: Suite) -> dict[str, Any]:
    contacts = suite.sizes.low_tier_first_sync_contacts
    ways: dict[str, Any] = {}
    for direction in suite.directions or tuple(DIRECTIONS):
        suite.say(f"low-tier: first sync {direction}, {contacts:,} contacts x 5 preferences")
        async with suite.world(options()) as world:
            await low_tier_world(world)
            async with traced(world, await all_stats(world)) as tracer:
                one = await one_backfill(suite, world, direction, contacts=contacts,
                                         label=f"low-tier-first-{direction}")
        throttled = {side: int(one["statuses"][side].get("429", 0)) for side in SIDES}
        ways[direction] = {
            "states": one["states"], "seconds": one["seconds"],
            "timeline_s": one["timeline_s"],
            "calls": {side: sum(one["calls"][side].values()) for side in SIDES},
            "by_route": one["calls"], "in_batches": one["operations_in_batches"],
            "throttled": throttled, "met": one["seconds"] < FIRST_SYNC_TARGET_S,
            # where the time went: dotdigital's calls in each 10 s of the run, by route
            "dotdigital_calls_per_10s": tracer.per_bucket("dotdigital", bucket_s=10.0),
        }
        suite.say(f"  {one['seconds']:.1f} s, dotdigital {ways[direction]['calls']['dotdigital']}"
                  f" calls, Dynamics {ways[direction]['calls']['dynamics']} calls, "
                  f"429s {throttled}")
    return ways


def _idle_figures(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side in SIDES:
        calls = median(r["idle"][side]["calls"] for r in rounds)
        out[side] = {"calls": calls, "target": IDLE_CALLS_TARGET[side],
                     "calls_each": [r["idle"][side]["calls"] for r in rounds],
                     "by_route": rounds[-1]["idle"][side]["by_route"],
                     "in_batches": rounds[-1]["idle"][side]["in_batches"],
                     "met": calls <= IDLE_CALLS_TARGET[side]}
    out["read"] = rounds[-1]["idle"]["read"]
    out["met"] = all(out[side]["met"] for side in SIDES)
    return out


def _sync_now_figures(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = median(r["sync_now"]["seconds"] for r in rounds)
    dotdigital = median(r["sync_now"]["dotdigital"]["calls"] for r in rounds)
    middle = sorted(rounds, key=lambda r: r["sync_now"]["seconds"])[len(rounds) // 2]
    return {
        "seconds": round(seconds, 3),
        "seconds_each": [r["sync_now"]["seconds"] for r in rounds],
        "dotdigital_calls": dotdigital,
        "dotdigital_calls_each": [r["sync_now"]["dotdigital"]["calls"] for r in rounds],
        "dynamics_calls": median(r["sync_now"]["dynamics"]["calls"] for r in rounds),
        "states_edited": middle["sync_now"]["states_edited"],
        "timeline_s": middle["sync_now"]["timeline_s"],
        "by_route": {side: middle["sync_now"][side]["by_route"] for side in SIDES},
        "call_trace": middle["sync_now"]["call_trace"],
        "met": seconds < SYNC_NOW_TARGET_S and dotdigital <= SYNC_NOW_DOTDIGITAL_CALLS,
    }


async def run(suite: Suite) -> dict[str, Any]:
    sizes = suite.sizes
    suite.say(f"low-tier: idle cycles and small syncs, {sizes.low_tier_contacts:,} contacts x "
              f"{PREFERENCES} preferences, {sizes.repeats} round(s)")
    async with suite.world() as world:
        setup, rounds = await one_account(suite, world)
    idle = _idle_figures(rounds)
    small = _sync_now_figures(rounds)
    first = await first_sync(suite)
    first_seconds = max(w["seconds"] for w in first.values())
    # a way not measured (``--direction``) is not met
    first_met = len(first) == len(DIRECTIONS) and all(w["met"] for w in first.values())
    return {
        "what": f"dotdigital at {CALLS_PER_MINUTE} calls/min, Dataverse at its documented "
                f"limits: idle cycle and a sync of {2 * EDITED_PER_SIDE} edited contacts "
                f"({sizes.low_tier_contacts:,} contacts x {PREFERENCES} preferences); first "
                f"sync of {sizes.low_tier_first_sync_contacts:,} contacts x 5 preferences",
        "target": f"idle cycle at most {IDLE_CALLS_TARGET['dotdigital']} dotdigital and "
                  f"{IDLE_CALLS_TARGET['dynamics']} Dataverse calls; sync now of "
                  f"{2 * EDITED_PER_SIDE} contacts from a rested account under "
                  f"{SYNC_NOW_TARGET_S:g} s and at most {SYNC_NOW_DOTDIGITAL_CALLS} dotdigital "
                  f"calls; first sync under {FIRST_SYNC_TARGET_S:g} s each way",
        "idle_cycle": idle,
        "sync_now": small,
        "first_sync": first,
        "idle_calls": {side: idle[side]["calls"] for side in SIDES},
        "sync_now_seconds": small["seconds"],
        "sync_now_dotdigital_calls": small["dotdigital_calls"],
        "first_sync_seconds": first_seconds,
        "setup": setup,
        "rounds": rounds,
        "met": idle["met"] and small["met"] and first_met,
        "measured": (
            f"idle cycle dotdigital {idle['dotdigital']['calls']:g} calls, Dataverse "
            f"{idle['dynamics']['calls']:g} ({'met' if idle['met'] else 'not met'}); sync now "
            f"{small['seconds']:.1f} s, {small['dotdigital_calls']:g} dotdigital calls "
            f"({'met' if small['met'] else 'not met'}); first sync "
            + ", ".join(f"{name} {w['seconds']:.0f} s" for name, w in first.items())
            + f" ({'met' if first_met else 'not met'})"),
    }
