"""memory: each service's resident memory with a backlog of a million changes queued.

A backfill into dotdigital run in stages, so the backlog piles up in the broker: the pollers
alone first (every change of the run queued for the reconciler), then the reconciler (every
write command queued for the writer), then the writer. Each service's resident set size is
sampled from ``/proc`` twice a second along with the depth of the queues it works on; the
figures are each service's peak (``VmHWM``), and its resident size across the quarters of the
backlog it faced, which is flat when memory does not follow the backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aio_pika

from bench.figures import median, rounded
from bench.harness import PREFERENCES, BenchError, World
from bench.stages import reconciled_all, until
from bench.suite import Suite
from bench.tracking import Progress
from common.domain import SIDES
from common.messaging.topology import Topology

TARGET_MB = 150.0
SAMPLE_S = 0.5
FLAT_MB = 10.0  # spread across the backlog's quarters still counted as flat
SERVICES = ("dynamics-poller", "ec-poller", "reconciler", "writer")
# which backlog each service faces: the pollers fill the changes queues, the reconciler drains
# them (and fills the writes queues), the writer drains the writes queues
FACES = {"dynamics-poller": "changes", "ec-poller": "changes", "reconciler": "changes",
         "writer": "writes"}


async def _sample(world: World, samples: list[dict[str, Any]], stop: asyncio.Event,
                  active: set[str]) -> None:
    shards = world.config.broker.shards
    changes = [Topology.changes_queue(world.account, s) for s in range(shards)]
    writes = [Topology.writes_queue(world.account, side, s) for side in SIDES
              for s in range(shards)]
    connection = await aio_pika.connect(world.config.broker.url)
    async with connection:
        while not stop.is_set():
            depths = await world.queue_depths(connection)
            samples.append({
                "at": time.monotonic(),
                "changes": sum(depths[q] for q in changes),
                "writes": sum(depths[q] for q in writes),
                # only services at work (started and consuming): not their start-up
                "rss": {name: m.get("rss_mb", 0.0) for name, m in world.memory().items()
                        if name in active},
            })
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_S)


def _by_quarter(samples: list[dict[str, Any]], service: str) -> list[float | None]:
    """The service's median RSS while the backlog it faces was in each quarter of its peak."""
    face = FACES[service]
    mine = [(s[face], s["rss"][service]) for s in samples if service in s["rss"]]
    top = max((b for b, _ in mine), default=0)
    if not top:
        return [None] * 4
    quarters: list[list[float]] = [[], [], [], []]
    for backlog, rss in mine:
        quarters[min(3, int(4 * backlog / (top + 1)))].append(rss)
    return [rounded(median(q), 1) if q else None for q in quarters]


async def one_memory(suite: Suite, world: World, *, contacts: int) -> dict[str, Any]:
    sizes = suite.sizes
    await world.seed(records=contacts, dynamics_states="all", dotdigital_states="none")
    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()
    active: set[str] = set()
    sampler = asyncio.create_task(_sample(world, samples, stop, active))
    try:
        await world.start_all(("dynamics-poller", "ec-poller"))
        active |= {"dynamics-poller", "ec-poller"}
        async with Progress(broker_url=world.config.broker.url, account=world.account) as progress:
            record = await progress.trigger()
            await until(lambda: len(record.pollers_done_at) == 2, world=world,
                        timeout_s=sizes.timeout_s, what="both pollers' reads")
            queued_changes = max(s["changes"] for s in samples) if samples else 0
            await world.start("reconciler")
            active.add("reconciler")
            await until(lambda: reconciled_all(record), world=world, timeout_s=sizes.timeout_s,
                        what="reconciling every change")
            await world.start("writer")
            active.add("writer")
            await progress.wait(record, timeout_s=sizes.timeout_s)
            if record.summary()["failed"]:
                raise BenchError(f"memory: the run failed: {record.summary()}")
    finally:
        stop.set()
        await sampler
    peaks = {n: round(m.get("peak_rss_mb", 0.0), 1) for n, m in world.memory().items()}
    return {
        "states": record.summary()["read"].get("dynamics", 0),
        "queued_change_messages": queued_changes,
        "queued_write_messages": max(s["writes"] for s in samples) if samples else 0,
        "peak_rss_mb": peaks,
        "rss_mb_by_backlog_quarter": {s: _by_quarter(samples, s) for s in SERVICES},
    }


async def run(suite: Suite) -> dict[str, Any]:
    contacts = suite.sizes.memory_contacts

    async def one(attempt: int) -> dict[str, Any]:
        async with suite.world() as world:
            result = await one_memory(suite, world, contacts=contacts)
        suite.say(f"  peak RSS {result['peak_rss_mb']}")
        return result

    repeats = await suite.repeat("memory", f"{contacts * PREFERENCES:,} changes queued in "
                                 "stages", one)
    results = repeats.runs
    peaks = {s: round(median(r["peak_rss_mb"].get(s, 0.0) for r in results), 1)
             for s in SERVICES}
    spread = {}
    for service in SERVICES:
        quarters = [q for q in results[len(results) // 2]["rss_mb_by_backlog_quarter"][service]
                    if q is not None]
        spread[service] = round(max(quarters) - min(quarters), 1) if quarters else None
    flat = all(v is not None and v <= max(FLAT_MB, 0.1 * peaks[s]) for s, v in spread.items())
    worst = max(peaks.values())
    return {
        "what": f"peak RSS of each service with {contacts * PREFERENCES:,} changes queued",
        "target": f"under {TARGET_MB:.0f} MB each, flat as the backlog grows",
        "peak_rss_mb": peaks,
        "rss_spread_over_backlog_mb": spread,
        "runs": results,
        "failed_runs": repeats.failed,
        "met": worst < TARGET_MB and flat,
        "measured": ", ".join(f"{s} {peaks[s]:.0f} MB (spread {spread[s]} MB)"
                              for s in SERVICES),
    }
