"""The suite: sizes, what every scenario gets to work with, and running them in order."""

from __future__ import annotations

import contextlib
import os
import platform
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import aio_pika

from bench.harness import BenchError, World, WorldOptions, make_world
from bench.profiling import profiling
from bench.sizes import Sizes

T = TypeVar("T")


@dataclass
class Repeats(Generic[T]):
    """A scenario's runs: the figures of those that finished, and why the others failed."""

    runs: list[T] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Suite:
    """One run of the suite: its broker, sizes, where profiles go, and what scenarios share
    (the ceiling, call counts of the backfills for api-economy)."""

    broker_url: str
    size_name: str
    sizes: Sizes
    profile_dir: Path | None = None
    keep: bool = False
    ceiling: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    # what latest.json held before this run, per scenario (figures a scenario may build on)
    previous: dict[str, Any] = field(default_factory=dict)
    # backfill: only these directions (the others are kept from latest.json)
    directions: tuple[str, ...] = ()
    log: Callable[[str], None] = print

    @contextlib.asynccontextmanager
    async def world(self, options: WorldOptions | None = None) -> AsyncIterator[World]:
        async with make_world(broker_url=self.broker_url, options=options or WorldOptions(),
                              keep=self.keep) as world:
            yield world

    @contextlib.asynccontextmanager
    async def profiled(self, world: World, label: str) -> AsyncIterator[None]:
        """Sample the world's processes while the block runs, with ``--profile``."""
        pids = {name: p.pid for name, p in {**world.services, **world.simulators}.items()}
        async with profiling(pids, self.profile_dir, label=label):
            yield

    def say(self, text: str) -> None:
        self.log(f"[{time.strftime('%H:%M:%S')}] {text}")

    async def attempt(self, name: str, run: int, one: Awaitable[T],
                      repeats: Repeats[T]) -> T | None:
        """Await one run of a scenario into ``repeats``: its figures, or (it failed) its
        reason, so that one failed run (a world that would not start, a stage that timed out)
        costs that run's figures only, never the other runs'."""
        try:
            result = await one
        except Exception as exc:
            traceback.print_exc()
            reason = f"{type(exc).__name__}: {exc}"[:500]
            self.say(f"  {name} run {run} failed: {reason}")
            repeats.failed.append({"run": run, "error": reason})
            return None
        repeats.runs.append(result)
        return result

    async def repeat(self, name: str, what: str, one: Callable[[int], Awaitable[T]]
                     ) -> Repeats[T]:
        """A scenario's repeats (1, 2, ...), each announced as ``NAME n/N: WHAT`` and awaited
        with :meth:`attempt`. Every run failing fails the scenario."""
        repeats: Repeats[T] = Repeats()
        for run in range(1, self.sizes.repeats + 1):
            self.say(f"{name} {run}/{self.sizes.repeats}: {what}")
            await self.attempt(name, run, one(run), repeats)
        return settled(name, repeats)


def settled(name: str, repeats: Repeats[T]) -> Repeats[T]:
    """``repeats``, unless no run finished: then the scenario fails with every run's reason."""
    if not repeats.runs:
        raise BenchError(f"every {name} run failed: "
                         + "; ".join(f"{f['run']}: {f['error']}" for f in repeats.failed))
    return repeats


Scenario = Callable[[Suite], Awaitable[dict[str, Any]]]


def _host() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_mb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        memory_mb = int(first.split()[1]) // 1024
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_mb": memory_mb}


async def machine(broker_url: str) -> dict[str, Any]:
    """What the figures were measured on (they are only comparable on the same machine)."""
    broker_version = None
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(broker_url)
        async with connection:
            properties = connection.transport.connection.server_properties  # type: ignore[union-attr]
            raw = properties.get("version")
            broker_version = raw.decode() if isinstance(raw, bytes) else str(raw)
    return {
        **_host(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "rabbitmq": broker_version,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
