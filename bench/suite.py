"""The suite: sizes, what every scenario gets to work with, and running them in order."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika

from bench.harness import World, WorldOptions, make_world
from bench.profiling import profiling
from bench.sizes import Sizes


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

    def attempts(self, name: str, what: str) -> Iterator[int]:
        """A scenario's repeats (1, 2, ...), each announced as ``NAME n/N: WHAT``."""
        for attempt in range(1, self.sizes.repeats + 1):
            self.say(f"{name} {attempt}/{self.sizes.repeats}: {what}")
            yield attempt


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
