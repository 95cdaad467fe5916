"""The faults a chaos run injects, each healing by itself, and a schedule to run them on.

Every fault is an async function of the world, a seeded random source and the profile's scale;
it records what it did (``Injected``) and returns once it healed. Durations come from the
profile, so the short CI form and the full run share the same code:

- ``kill``: SIGKILL a process of each service at random moments (the supervisor restarts it);
- ``failpoint``: start a service's processes with one of ``common.ops.failpoints.POINTS`` set, wait
  for a process to die there (the supervisor restarts it without), or give up after a while;
- ``broker-restart``: stop the private RabbitMQ node, start it again after a pause;
- ``broker-connections``: ``rabbitmqctl close_all_connections``;
- ``postgres-stop``: stop the private PostgreSQL cluster for a while (PostgreSQL ledger only);
- ``sqlite-lock``: another process holds the ledger's write lock longer than the services'
  busy timeout (SQLite ledger only);
- ``vendor-errors``: 5 % of every API call to both vendors answers 500;
- ``vendor-outage``: every API call to one vendor answers 500 for a while;
- ``vendor-429``: one vendor throttles hard, with a long ``Retry-After``;
- ``vendor-latency``: writes to one vendor take longer than the client's timeout (they land
  after the client gave up: writes that may have landed);
- ``clock-offset``: one vendor's clock runs ahead or behind for a while.

The last four name their vendor (``vendor-outage:dotdigital``) or leave it to chance.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from common.ops.failpoints import POINTS
from tests.harness.chaos.world import ChaosWorld

# Which service reaches each failpoint (consumer.before-ack: every consumer; the writer's ack
# is the one after a vendor write).
FAILPOINT_SERVICE = {name: name.split(".", 1)[0] for name in POINTS}
FAILPOINT_SERVICE["consumer.before-ack"] = "writer"

SQLITE_BUSY_TIMEOUT_S = 60.0
WRITE_ROUTES = {
    "dotdigital": ("PUT /v2/contacts", "PUT /contacts/v3/import", "PATCH /contacts/v3"),
    "dynamics": ("POST /api/data/v9.2/$batch", "PATCH /api/data/v9.2/", "POST /api/data/v9.2/"),
}


@dataclass(frozen=True, kw_only=True)
class Scale:
    """How long faults last: the short CI form or the full run."""

    broker_down_s: tuple[float, float] = (10.0, 60.0)
    postgres_down_s: float = 30.0
    sqlite_hold_s: float = SQLITE_BUSY_TIMEOUT_S + 10.0
    outage_s: float = 180.0
    storm_s: float = 60.0
    storm_retry_after_s: float = 60.0
    latency_s: float = 60.0
    offset_s: float = 30.0
    offset_hold_s: float = 60.0
    failpoint_wait_s: float = 60.0
    kills: int = 4


FULL = Scale()
SHORT = Scale(broker_down_s=(4.0, 6.0), postgres_down_s=5.0, sqlite_hold_s=6.0, outage_s=8.0,
              storm_s=8.0, storm_retry_after_s=6.0, latency_s=8.0, offset_s=3.0,
              offset_hold_s=8.0, failpoint_wait_s=15.0, kills=2)


@dataclass
class Injected:
    """One fault as it happened."""

    kind: str
    detail: dict[str, Any] = field(default_factory=dict)
    started_s: float = 0.0
    healed_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.detail, "started_s": round(self.started_s, 1),
                "healed_s": round(self.healed_s, 1)}


FaultFn = Callable[[ChaosWorld, random.Random, Scale, Injected], Awaitable[None]]


async def kill(world: ChaosWorld, rng: random.Random, scale: Scale, fault: Injected) -> None:
    """SIGKILL one process of each of ``scale.kills`` services (all four in the full run), in a
    random order, a few seconds apart."""
    victims = []
    services = sorted({r.service for r in world.replicas.values()})
    rng.shuffle(services)
    for service in services[:scale.kills]:
        await asyncio.sleep(rng.uniform(1.0, 4.0))  # the kills' spacing: a schedule, not a wait
        alive = sorted((r for r in world.of(service) if r.alive), key=lambda r: r.name)
        if alive:
            replica = rng.choice(alive)
            world.kill(replica)
            victims.append(replica.name)
    fault.detail["victims"] = victims


def failpoint(point: str) -> FaultFn:
    async def run(world: ChaosWorld, rng: random.Random, scale: Scale, fault: Injected) -> None:
        service = FAILPOINT_SERVICE[point]
        before = world.fired(point)
        replicas = world.of(service)
        for replica in replicas:
            await world.restart_with(replica, point)
        fired = await world.wait_fired(point, more_than=before, timeout_s=scale.failpoint_wait_s)
        fault.detail.update({"point": point, "service": service, "fired": fired})
        if not fired:
            # never reached: start them again without it
            for replica in replicas:
                if replica.running_with == point:
                    await world.restart_with(replica, "")
    return run


async def broker_restart(world: ChaosWorld, rng: random.Random, scale: Scale,
                         fault: Injected) -> None:
    down = rng.uniform(*scale.broker_down_s)
    fault.detail["down_s"] = round(down, 1)
    await world.broker.stop()
    try:
        await asyncio.sleep(down)  # the outage lasts this long: a fault's duration, not a wait
    finally:
        await world.broker.start()


async def broker_connections(world: ChaosWorld, rng: random.Random, scale: Scale,
                             fault: Injected) -> None:
    await world.broker.close_all_connections()


async def postgres_stop(world: ChaosWorld, rng: random.Random, scale: Scale,
                        fault: Injected) -> None:
    assert world.postgres is not None
    fault.detail["down_s"] = scale.postgres_down_s
    await world.postgres.stop(mode="fast")
    try:
        await asyncio.sleep(scale.postgres_down_s)  # the outage's duration, not a wait
    finally:
        await world.postgres.start()


_HOLD_LOCK = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=120)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))  # the lock is held this long: the fault's duration
db.execute("COMMIT")
"""


async def sqlite_lock(world: ChaosWorld, rng: random.Random, scale: Scale,
                      fault: Injected) -> None:
    path = world.config.store.url.removeprefix("sqlite:///")
    fault.detail["hold_s"] = scale.sqlite_hold_s
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLD_LOCK, path, str(scale.sqlite_hold_s),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        assert holder.stdout is not None
        fault.detail["locked"] = (await holder.stdout.readline()).strip() == b"locked"
        await holder.wait()
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


async def _vendor(world: ChaosWorld, side: str, body: dict[str, Any], hold_s: float,
                  fault: Injected) -> None:
    name = f"{fault.kind}@{fault.started_s:.1f}"
    await world.vendor_fault(side, name, body)
    try:
        await asyncio.sleep(hold_s)  # the vendor misbehaves this long: a fault's duration
    finally:
        await world.vendor_fault(side, name, None)


async def vendor_errors(world: ChaosWorld, rng: random.Random, scale: Scale,
                        fault: Injected) -> None:
    body = {"error_rate": {"* /": 0.05}}
    fault.detail.update({"rate": 0.05, "hold_s": scale.storm_s})
    await asyncio.gather(*(_vendor(world, side, body, scale.storm_s, fault)
                           for side in ("dynamics", "dotdigital")))


def _one_side(run: Callable[[ChaosWorld, str, random.Random, Scale, Injected],
                             Awaitable[None]], side: str | None) -> FaultFn:
    """The fault on ``side``, or (None) on a side drawn at random."""
    async def fault_fn(world: ChaosWorld, rng: random.Random, scale: Scale,
                       fault: Injected) -> None:
        await run(world, side or rng.choice(("dynamics", "dotdigital")), rng, scale, fault)
    return fault_fn


async def vendor_outage(world: ChaosWorld, side: str, rng: random.Random, scale: Scale,
                        fault: Injected) -> None:
    fault.detail.update({"side": side, "rate": 1.0, "hold_s": scale.outage_s})
    await _vendor(world, side, {"error_rate": {"* /": 1.0}}, scale.outage_s, fault)


async def vendor_429(world: ChaosWorld, side: str, rng: random.Random, scale: Scale,
                     fault: Injected) -> None:
    body = {"throttle": {"limit": 2, "window_s": scale.storm_retry_after_s}}
    fault.detail.update({"side": side, "retry_after_up_to_s": scale.storm_retry_after_s,
                         "hold_s": scale.storm_s})
    await _vendor(world, side, body, scale.storm_s, fault)


async def vendor_latency(world: ChaosWorld, side: str, rng: random.Random, scale: Scale,
                         fault: Injected) -> None:
    delay_ms = (world.spec.client_timeout_s + 2.0) * 1000
    body = {"latency_ms": dict.fromkeys(WRITE_ROUTES[side], delay_ms)}
    fault.detail.update({"side": side, "latency_ms": delay_ms, "hold_s": scale.latency_s})
    await _vendor(world, side, body, scale.latency_s, fault)


async def clock_offset(world: ChaosWorld, side: str, rng: random.Random, scale: Scale,
                       fault: Injected) -> None:
    offset = round(rng.choice((-1, 1)) * scale.offset_s)
    fault.detail.update({"side": side, "offset_s": offset, "hold_s": scale.offset_hold_s})
    # when the clock stepped (out and back), by real time: the checker's tie band around them
    steps = fault.detail.setdefault("steps_at", [])
    await world.set_offset(side, offset)
    steps.append(datetime.now(UTC).isoformat())
    try:
        await asyncio.sleep(scale.offset_hold_s)  # the clock stays off this long (the fault)
    finally:
        await world.set_offset(side, 0.0)
        steps.append(datetime.now(UTC).isoformat())


# One vendor at a time: ``vendor-outage`` draws the side, ``vendor-outage:dotdigital`` names it.
_PER_SIDE = {"vendor-outage": vendor_outage, "vendor-429": vendor_429,
             "vendor-latency": vendor_latency, "clock-offset": clock_offset}

FAULTS: dict[str, FaultFn] = {
    "kill": kill,
    **{f"failpoint:{point}": failpoint(point) for point in POINTS},
    "broker-restart": broker_restart,
    "broker-connections": broker_connections,
    "postgres-stop": postgres_stop,
    "sqlite-lock": sqlite_lock,
    "vendor-errors": vendor_errors,
    **{name: _one_side(run, None) for name, run in _PER_SIDE.items()},
    **{f"{name}:{side}": _one_side(run, side) for name, run in _PER_SIDE.items()
       for side in ("dynamics", "dotdigital")},
}
BACKEND_ONLY = {"postgres-stop": "postgres", "sqlite-lock": "sqlite"}


def kinds_for(backend: str) -> list[str]:
    """Every fault kind that applies to the backend, each vendor's faults on each vendor."""
    return [k for k in FAULTS if BACKEND_ONLY.get(k, backend) == backend and k not in _PER_SIDE]


async def inject(world: ChaosWorld, kinds: list[str], *, rng: random.Random, scale: Scale,
                 window_s: float, clock: Callable[[], float]) -> list[Injected]:
    """Run ``kinds`` during a window of ``window_s``: each starts at a random moment of its
    first half (in order, so a run's faults may overlap: "mixed"), and heals by itself."""
    starts = sorted(rng.uniform(0, window_s / 2) for _ in kinds)
    done: list[Injected] = []
    began = time.monotonic()

    async def one(kind: str, delay: float) -> None:
        # the fault's start time, drawn above: a schedule, not a wait
        await asyncio.sleep(max(0.0, delay - (time.monotonic() - began)))
        fault = Injected(kind=kind, started_s=clock())
        world.say(f"  fault {kind} at {fault.started_s:.1f} s")
        try:
            await FAULTS[kind](world, random.Random(rng.random()), scale, fault)
        except Exception as exc:  # a fault that could not be applied is reported, not fatal
            fault.detail["error"] = f"{type(exc).__name__}: {exc}"[:300]
        fault.healed_s = clock()
        done.append(fault)

    await asyncio.gather(*(one(kind, start) for kind, start in zip(kinds, starts, strict=True)))
    return done
