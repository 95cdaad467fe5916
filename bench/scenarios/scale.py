"""scale: one, two and four writer replicas, each with a fixed CPU quota; then bound by latency.

Each run is a backfill into dotdigital on a fresh world with 8 shards per queue and a
PostgreSQL ledger (a schema of its own), in stages: the pollers and the reconciler first, until
every write command of the run is queued; then every vendor call is delayed by the run's
latency (both simulators, every API route) and ``writers`` writer replicas (``prefsync run
writer``, each its own process) are started together and drain the backlog.

Two parts, the runs of each interleaved (1, 2, 4, 1, 2, 4, ...) so that the noise of a shared
machine falls on every replica count alike:

1. **quota'd** (the figure the target is about): each writer replica gets a quarter core of
   CPU, in a cgroup of its own (:mod:`bench.quota`), pinned to the last CPU; the simulators,
   the other services and a RabbitMQ node and a PostgreSQL cluster of the run's own (the
   machine's run on every CPU) are pinned to the other CPU(s). The vendors answer in a few
   milliseconds, so each replica is bound by its quota: four replicas have four times one's
   CPU, and should do four times its work while spending as much CPU per state (no
   coordination overhead). Where cgroups cannot be written the result says why (``quota``)
   and the runs go on without.
2. **latency-bound**: the vendors answer in 100 ms and no process has a quota: more writers
   must add throughput by having more calls under way.

Throughput and CPU are measured over the part of the run in which every replica is at work:
from the moment the writers' membership shows the shard queues dealt among all of them (the
replicas' start-up, imports included, is a fixed cost per process, not per state) to the last
write. CPU is every process's own (``/proc``), per state written in that window; the whole
run's figures (first to last write) are kept beside them, and so is what the replicas share in
that window: how busy the other CPU(s) were, the share of the replicas' CPU that went to other
processes, and the PostgreSQL server's CPU per state.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cpu import (
    busy_share,
    cpu_per_state,
    cpu_seconds,
    cpu_since,
    cpus_busy_s,
    median_cpu,
    postgres_cpu_s,
    process_stats,
)
from bench.figures import median
from bench.harness import PREFERENCES, BenchError, Process, World, WorldOptions, make_world
from bench.ledger import POSTGRES_URL, postgres_ledger, postgres_unreachable
from bench.quota import QUARTER_CORE, Quotas, cpu_quotas, probe, unavailable
from bench.stages import reconciled_all, until
from bench.suite import Repeats, Suite, settled
from bench.tracking import Progress, RunRecord
from common.store import open_store
from services.runtime.assignment import group_name, holders
from tests.harness.private_services import (
    postgres_available,
    private_postgres,
    private_rabbitmq,
    rabbitmq_available,
)
from tests.harness.queues import service_queues

SHARDS = 8
TARGET_SPEEDUP = 3.5
TARGET_CPU_RATIO = 1.10
SCALE_TARGET_WRITERS = 4
SERVICES = ("dynamics-poller", "ec-poller", "reconciler")


@dataclass(frozen=True, kw_only=True)
class Part:
    """One part of the scenario: its name, the vendors' latency, whether replicas get quotas."""

    name: str
    latency_ms: float
    quota: bool


async def _spread(world: World, *, replicas: list[str], record: RunRecord) -> None:
    """Until the writer queues are dealt among all ``replicas`` (or the run is done)."""
    queues = set(service_queues(world.account, "writer", shards=SHARDS))
    group = group_name("writer", world.account)
    async with open_store(world.config.store.url) as store:
        while not record.done.is_set():
            owners = holders(await store.members(group))
            if set(owners) == queues and set(owners.values()) == set(replicas):
                return
            world.check_alive()
            await asyncio.sleep(0.1)


def _written_by(record: RunRecord, moment: float) -> int:
    """States written by ``moment`` (``time.monotonic()``), from the run's write events."""
    assert record.started_at is not None
    return sum(n for at, n in record.write_latencies if record.started_at + at <= moment)


def _writers_us_per_state(cpu: Mapping[str, Any]) -> float:
    return round(sum(float(v) for n, v in cpu["product_us_per_state"].items()
                     if n.startswith("writer-")), 2)


def _processes(world: World) -> dict[str, Process]:
    return {**world.services, **world.simulators}


async def one_scale(suite: Suite, world: World, *, writers: int, contacts: int,
                    latency_ms: float, quotas: Quotas | None) -> dict[str, Any]:
    if quotas is not None:
        for process in world.simulators.values():
            quotas.pin(pid=process.pid)
    seeded = await world.seed(records=contacts, dynamics_states="all", dotdigital_states="none")
    expected = seeded["dynamics"]["subscriptions"]
    await world.start_all(SERVICES)
    if quotas is not None:
        for service in SERVICES:
            quotas.pin(pid=world.services[service].pid)
    timeout = suite.sizes.timeout_s
    cpu_before = cpu_seconds(_processes(world))
    async with Progress(broker_url=world.config.broker.url, account=world.account) as progress:
        record = await progress.trigger()
        await until(lambda: reconciled_all(record), world=world, timeout_s=timeout,
                    what="reconciling every change")
        for side in ("dynamics", "dotdigital"):
            await world.faults(side, {"latency_ms": {"* /": latency_ms}})
        replicas = [f"writer-{i + 1}" for i in range(writers)]
        for name in replicas:
            started = await world.start("writer", replica=name, wait=False)
            if quotas is not None:
                quotas.limit(name=name, pid=started.pid)
        async with suite.profiled(world, f"scale-{writers}"):
            await _spread(world, replicas=replicas, record=record)
            spread_at = time.monotonic()
            cpu_spread = cpu_seconds(_processes(world))
            shared_spread = _shared_cpu(quotas)
            await progress.wait(record, timeout_s=timeout)
    shared = _shared_cpu(quotas)
    cpu_window = cpu_since(cpu_spread, _processes(world))
    # the writer replicas started after the first snapshot: all of their CPU counts
    cpu_all = cpu_since(cpu_before, _processes(world))
    throttled = {n: quotas.cpu_stat(n) for n in replicas} if quotas is not None else {}
    landed = await world.dotdigital_states()
    if record.summary()["failed"] or landed != expected:
        raise BenchError(f"scale: {landed} of {expected} states written; {record.summary()}")
    assert record.first_written_at is not None and record.last_written_at is not None
    whole = max(1e-3, record.last_written_at - record.first_written_at)
    in_window = expected - _written_by(record, spread_at)
    window = record.last_written_at - spread_at
    spread = in_window > 0 and window > 0
    if not spread:
        # every state was written before the last replica took its shards (tiny runs): the
        # whole run's figures stand in
        in_window, window, cpu_window = expected, whole, cpu_all
    cpu = cpu_per_state(cpu_window, states=in_window, simulators=world.simulators)
    if not spread:
        shared_spread = shared  # (no window: the shared figures say nothing)
    postgres_s = shared.postgres_s - shared_spread.postgres_s
    return {
        "writers": writers, "states": expected, "seconds": round(record.seconds, 3),
        "window": "every replica at work" if spread else "the whole run (too small to spread)",
        "states_in_window": in_window, "window_seconds": round(window, 3),
        "states_per_s": round(in_window / window, 1),
        "writing_seconds": round(whole, 3), "states_per_s_whole": round(expected / whole, 1),
        "cpu_s": cpu_window, "cpu": cpu, "writers_us_per_state": _writers_us_per_state(cpu),
        "cpu_s_whole": cpu_all,
        "cpu_whole": cpu_per_state(cpu_all, states=expected, simulators=world.simulators),
        "throttled": {n: {k: s.get(k) for k in ("nr_periods", "nr_throttled")}
                      for n, s in throttled.items()},
        # what the replicas share, in the window: the CPU(s) the rest runs on, and the
        # ledger's server (which the product's figures leave out)
        "other_cpus_busy": busy_share(shared_spread.other_cpus, shared.other_cpus),
        "others_on_quota_cpus": _others_on_quota_cpus(
            shared_spread, shared, sum(cpu_window.get(n, 0.0) for n in replicas)),
        "postgresql_us_per_state": (round(postgres_s * 1e6 / in_window, 2) if spread
                                    else None),
    }


@dataclass(frozen=True)
class _Shared:
    other_cpus: tuple[float, float]  # busy and total seconds (bench.cpu.cpus_busy_s)
    quota_cpus: tuple[float, float]  # (the same of the replicas' CPU(s); none without quotas)
    postgres_s: float


def _shared_cpu(quotas: Quotas | None) -> _Shared:
    """The CPU the replicas share so far: the other CPUs' (all of them without quotas), the
    replicas' own and the PostgreSQL server's."""
    others = quotas.other_cpus if quotas is not None else range(os.cpu_count() or 1)
    return _Shared(other_cpus=cpus_busy_s(others),
                   quota_cpus=cpus_busy_s(quotas.quota_cpus if quotas is not None else ()),
                   postgres_s=postgres_cpu_s())


def _others_on_quota_cpus(before: _Shared, after: _Shared, replicas_s: float) -> float | None:
    """The share of the replicas' CPU(s) time that went to other processes (whatever is not
    kept off it: the kernel's own work, the machine's other processes): what the replicas'
    quotas could not have."""
    total = after.quota_cpus[1] - before.quota_cpus[1]
    if total <= 0:
        return None
    busy = after.quota_cpus[0] - before.quota_cpus[0]
    return round(max(0.0, busy - replicas_s) / total, 3)


@dataclass(frozen=True)
class _OwnServices:
    """The broker and database of a quota'd run (None: the machine's)."""

    broker_url: str | None = None
    postgres_url: str = POSTGRES_URL

    def describe(self) -> str:
        if self.broker_url is None:
            return ("the machine's RabbitMQ and PostgreSQL (their servers' binaries are not "
                    "here to run the run's own) on every CPU")
        return ("a RabbitMQ node and a PostgreSQL cluster (fsync off) of the run's own on the "
                "other CPU(s)")


@contextlib.asynccontextmanager
async def _own_services(quotas: Quotas | None) -> AsyncIterator[_OwnServices]:
    """With quotas: a RabbitMQ node and a PostgreSQL cluster of the run's own, pinned with the
    simulators, so that nothing but the replicas runs on the replicas' CPU (the machine's own
    servers run on every CPU, and a bench does not move them). Without quotas, or without the
    servers' binaries: the machine's."""
    if quotas is None or not (rabbitmq_available() and postgres_available()):
        yield _OwnServices()
        return
    async with private_rabbitmq() as broker, private_postgres() as database:
        for pid in _tree(_pid_in(broker.root / "node.pid")):
            quotas.pin(pid=pid)
        # its backends, forked for each connection, start in the postmaster's groups
        for pid in _tree(_pid_in(database.data / "postmaster.pid")):
            quotas.pin(pid=pid)
        yield _OwnServices(broker_url=broker.url, postgres_url=database.url)


def _pid_in(path: Path) -> int:
    """The pid a server wrote on the first line of its pid file."""
    return int(path.read_text().split()[0])


def _tree(root: int) -> list[int]:
    """``root`` and every process descending from it, now."""
    children: dict[int, list[int]] = {}
    for pid, _, fields in process_stats():
        children.setdefault(int(fields[1]), []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


@contextlib.asynccontextmanager
async def _quotas(part: Part, available: str | None) -> AsyncIterator[Quotas | None]:
    if not part.quota or available is not None:
        yield None
        return
    with cpu_quotas(share=QUARTER_CORE) as quotas:
        yield quotas


def _summary(part: Part, by_writers: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    rates = {w: median(r["states_per_s"] for r in runs) for w, runs in by_writers.items()}
    base = rates[min(rates)]
    cpu = {w: median_cpu([r["cpu"] for r in runs]) for w, runs in by_writers.items()}
    writers_cpu = {w: median(r["writers_us_per_state"] for r in runs)
                   for w, runs in by_writers.items()}
    one = min(rates)

    def ratio(value: float, of: float) -> float | None:
        return round(value / of, 3) if of else None

    return {
        "latency_ms": part.latency_ms,
        "states_per_s": {str(w): round(r, 1) for w, r in rates.items()},
        "speedup": {str(w): round(rate / base, 2) for w, rate in rates.items()},
        "cpu": {str(w): c for w, c in cpu.items()},
        "product_cpu_ratio": {str(w): ratio(c["product_us_per_state_total"],
                                            cpu[one]["product_us_per_state_total"])
                              for w, c in cpu.items()},
        "writers_us_per_state": {str(w): round(v, 2) for w, v in writers_cpu.items()},
        "writers_cpu_ratio": {str(w): ratio(v, writers_cpu[one])
                              for w, v in writers_cpu.items()},
        "simulators_over_10pct": any(c["simulators_over_10pct"] for c in cpu.values()),
        "other_cpus_busy": {str(w): _median_of(runs, "other_cpus_busy")
                            for w, runs in by_writers.items()},
        "postgresql_us_per_state": {str(w): _median_of(runs, "postgresql_us_per_state")
                                    for w, runs in by_writers.items()},
        "others_on_quota_cpus": {str(w): _median_of(runs, "others_on_quota_cpus")
                                 for w, runs in by_writers.items()},
        "runs": {str(w): runs for w, runs in by_writers.items()},
    }


def _median_of(runs: list[dict[str, Any]], figure: str) -> float | None:
    """The median of a figure of runs that have it (None: none has)."""
    values = [r[figure] for r in runs if r.get(figure) is not None]
    return round(median(values), 3) if values else None


def _shared(summary: dict[str, Any], writers: str) -> str:
    """What the replicas shared in the runs of ``writers``, for the ``measured`` text."""
    busy = summary["other_cpus_busy"].get(writers)
    postgres = summary["postgresql_us_per_state"].get(writers)
    others = summary["others_on_quota_cpus"].get(writers)
    return ("" if busy is None else f", the other CPU(s) {busy * 100:.0f}% busy") + (
        "" if others is None else f", {others * 100:.0f}% of the replicas' CPU to others") + (
        "" if postgres is None else f", PostgreSQL {postgres:,.0f} µs/state")


def _measured(summary: dict[str, Any]) -> str:
    return ", ".join(
        f"{w} {summary['states_per_s'][w]:,.0f} states/s ({summary['speedup'][w]:.2f}x, "
        f"product {summary['cpu'][w]['product_us_per_state_total']:,.0f} CPU-s per 1M states, "
        f"{summary['product_cpu_ratio'][w]:.2f}x one's{_shared(summary, w)})"
        for w in summary["states_per_s"])


async def run(suite: Suite) -> dict[str, Any]:
    sizes = suite.sizes
    parts = (Part(name="quota", latency_ms=sizes.scale_quota_latency_ms, quota=True),
             Part(name="latency_bound", latency_ms=sizes.scale_latency_ms, quota=False))
    quota_note = unavailable()
    mechanism = f"not available: {quota_note}" if quota_note else probe().describe()
    if quota_note is not None:
        suite.say(f"scale: quota: {mechanism}; the quota'd part runs without quotas")
    ledger_problem = await postgres_unreachable()
    if ledger_problem is not None:
        raise BenchError(f"scale runs on a PostgreSQL ledger: {ledger_problem}")
    states = sizes.scale_contacts * PREFERENCES
    by_part: dict[str, dict[int, list[dict[str, Any]]]] = {p.name: {} for p in parts}
    described = mechanism
    repeats: Repeats[dict[str, Any]] = Repeats()
    for attempt in range(1, sizes.repeats + 1):
        for part in parts:
            for writers in sizes.scale_writers:
                suite.say(f"scale {part.name}: {writers} writer(s) {attempt}/"
                          f"{sizes.repeats}, {states:,} states, {part.latency_ms:.0f} ms API "
                          f"latency{', a quarter core each' if part.quota else ''}")

                async def one(part: Part = part, writers: int = writers) -> dict[str, Any]:
                    nonlocal described
                    async with _quotas(part, quota_note) as quotas, \
                            _own_services(quotas) as own, \
                            postgres_ledger(own.postgres_url) as store_url, \
                            make_world(broker_url=own.broker_url or suite.broker_url,
                                       options=WorldOptions(shards=SHARDS, store_url=store_url),
                                       keep=suite.keep) as world:
                        if quotas is not None:
                            described = f"{quotas.describe()}; {own.describe()}"
                        result = await one_scale(suite, world, writers=writers,
                                                 contacts=sizes.scale_contacts,
                                                 latency_ms=part.latency_ms, quotas=quotas)
                    suite.say(f"  {result['states_per_s']:,.0f} states/s with every replica at "
                              f"work, product {result['cpu']['product_us_per_state_total']:,.0f}"
                              f" CPU µs per state ({result['seconds']:.1f} s in all)")
                    return result

                result = await suite.attempt(f"scale {part.name} {writers} writer(s)", attempt,
                                             one(), repeats)
                if result is not None:
                    by_part[part.name].setdefault(writers, []).append(result)
    for part in parts:
        missing = [w for w in sizes.scale_writers if not by_part[part.name].get(w)]
        if missing:
            # a ratio to one replica needs at least one run of every count
            settled(f"scale {part.name} with {missing} writer(s)", Repeats(failed=repeats.failed))
    quota = _summary(parts[0], by_part["quota"])
    latency = _summary(parts[1], by_part["latency_bound"])
    most = max(sizes.scale_writers)
    goal = str(max(SCALE_TARGET_WRITERS, most))
    quota_ok = quota_note is None
    speedup_met = quota_ok and quota["speedup"].get(goal, 0) >= TARGET_SPEEDUP
    cpu_ratio = quota["product_cpu_ratio"].get(goal)
    cpu_met = quota_ok and cpu_ratio is not None and cpu_ratio <= TARGET_CPU_RATIO
    rates = [latency["states_per_s"][str(w)] for w in sizes.scale_writers]
    latency_met = all(b > a for a, b in itertools.pairwise(rates))
    quota_text = "a quarter core each" if quota_ok else "no quota (not available)"
    return {
        "what": f"writer replicas {', '.join(map(str, sizes.scale_writers))}, {quota_text}, "
                f"{sizes.scale_quota_latency_ms:g} ms API latency; then {latency['latency_ms']:g}"
                f" ms and no quota ({states:,} states into dotdigital, {SHARDS} shards, "
                f"PostgreSQL ledger)",
        "target": f"{goal} replicas with a quarter core each at least {TARGET_SPEEDUP}x one; "
                  f"product CPU-s per 1M states within {TARGET_CPU_RATIO - 1:.0%} of one's; "
                  f"at {latency['latency_ms']:g} ms, more writers add throughput",
        "quota": mechanism if not quota_ok else described,
        "ledger": "postgresql",
        **{k: quota[k] for k in ("states_per_s", "speedup", "cpu", "product_cpu_ratio",
                                 "writers_us_per_state", "writers_cpu_ratio",
                                 "simulators_over_10pct", "other_cpus_busy",
                                 "others_on_quota_cpus", "postgresql_us_per_state", "runs")},
        "latency_bound": latency,
        "failed_runs": repeats.failed,
        "met_speedup": speedup_met,
        "met_cpu_flat": cpu_met,
        "met_latency_bound": latency_met,
        "met": speedup_met and cpu_met and latency_met,
        "measured": f"quota'd: {_measured(quota)}; at {latency['latency_ms']:g} ms, no quota: "
                    + ", ".join(f"{w} {latency['states_per_s'][w]:,.0f} states/s "
                                f"({latency['speedup'][w]:.2f}x)"
                                for w in latency["states_per_s"]),
    }
