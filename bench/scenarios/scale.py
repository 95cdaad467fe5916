"""scale: one, two and four writer processes against vendor APIs that answer in 50 ms.

Each run is a backfill into dotdigital on a fresh world with 8 shards per queue, in stages: the
pollers and the reconciler first, until every write command of the run is queued; then every
vendor call is delayed by the latency (both simulators, every API route) and ``writers`` writer
replicas (``prefsync run writer``, each its own process) are started together and drain the
backlog. The figure is the writers' throughput: states written per second from the first to
the last write the run reports (the replicas' start-up and the dealing of the shard queues among
them included); the target compares four writers with one.
"""

from __future__ import annotations

from typing import Any

from bench.cpu import cpu_per_state, cpu_seconds, cpu_since, median_cpu
from bench.figures import median
from bench.harness import PREFERENCES, BenchError, World, WorldOptions
from bench.stages import reconciled_all, until
from bench.suite import Suite
from bench.tracking import Progress

SHARDS = 8
TARGET_SPEEDUP = 3.5
SCALE_TARGET_WRITERS = 4


async def one_scale(suite: Suite, world: World, *, writers: int, contacts: int,
                    latency_ms: float) -> dict[str, Any]:
    seeded = await world.seed(records=contacts, dynamics_states="all", dotdigital_states="none")
    expected = seeded["dynamics"]["subscriptions"]
    await world.start_all(("dynamics-poller", "ec-poller", "reconciler"))
    timeout = suite.sizes.timeout_s
    cpu_before = cpu_seconds({**world.services, **world.simulators})
    async with Progress(broker_url=world.config.broker.url, account=world.account) as progress:
        record = await progress.trigger()
        await until(lambda: reconciled_all(record), world=world, timeout_s=timeout,
                    what="reconciling every change")
        for side in ("dynamics", "dotdigital"):
            await world.faults(side, {"latency_ms": {"* /": latency_ms}})
        replicas = [f"writer-{i + 1}" for i in range(writers)]
        for name in replicas:
            await world.start("writer", replica=name, wait=False)
        async with suite.profiled(world, f"scale-{writers}"):
            await progress.wait(record, timeout_s=timeout)
    # the writer replicas started after the snapshot: all of their CPU counts
    cpu = cpu_since(cpu_before, {**world.services, **world.simulators})
    landed = await world.dotdigital_states()
    if record.summary()["failed"] or landed != expected:
        raise BenchError(f"scale: {landed} of {expected} states written; {record.summary()}")
    assert record.first_written_at is not None and record.last_written_at is not None
    writing = max(1e-3, record.last_written_at - record.first_written_at)
    return {"writers": writers, "states": expected, "seconds": round(record.seconds, 3),
            "writing_seconds": round(writing, 3), "states_per_s": round(expected / writing, 1),
            "cpu_s": cpu,
            "cpu": cpu_per_state(cpu, states=expected, simulators=world.simulators)}


async def run(suite: Suite) -> dict[str, Any]:
    sizes = suite.sizes
    by_writers: dict[int, list[dict[str, Any]]] = {}
    for writers in sizes.scale_writers:
        by_writers[writers] = []
        for attempt in range(sizes.repeats):
            suite.say(f"scale: {writers} writer(s) {attempt + 1}/{sizes.repeats}, "
                      f"{sizes.scale_contacts * PREFERENCES:,} states, "
                      f"{sizes.scale_latency_ms:.0f} ms API latency")
            async with suite.world(WorldOptions(shards=SHARDS)) as world:
                one = await one_scale(suite, world, writers=writers,
                                      contacts=sizes.scale_contacts,
                                      latency_ms=sizes.scale_latency_ms)
            suite.say(f"  {one['states_per_s']:,.0f} states/s while writing "
                      f"({one['seconds']:.1f} s in all)")
            by_writers[writers].append(one)
    rates = {w: median(r["states_per_s"] for r in runs) for w, runs in by_writers.items()}
    base = rates[min(rates)]
    speedup = {w: round(rate / base, 2) for w, rate in rates.items()}
    most = max(rates)
    goal = max(SCALE_TARGET_WRITERS, most)
    return {
        "what": f"writers {', '.join(map(str, rates))} with {sizes.scale_latency_ms:.0f} ms API "
                f"latency ({sizes.scale_contacts * PREFERENCES:,} states into dotdigital, "
                f"{SHARDS} shards)",
        "target": f"{goal} writers at least {TARGET_SPEEDUP}x one",
        "states_per_s": {str(w): round(r, 1) for w, r in rates.items()},
        "speedup": {str(w): s for w, s in speedup.items()},
        "runs": {str(w): runs for w, runs in by_writers.items()},
        "cpu": {str(w): median_cpu([r["cpu"] for r in runs]) for w, runs in by_writers.items()},
        "simulators_over_10pct": any(median_cpu([r["cpu"] for r in runs])["simulators_over_10pct"]
                                     for runs in by_writers.values()),
        "met": speedup[goal] >= TARGET_SPEEDUP if goal in speedup else None,
        "measured": ", ".join(f"{w} writer(s) {rates[w]:,.0f} states/s ({speedup[w]:.2f}x)"
                              for w in rates),
    }
