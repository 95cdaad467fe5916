"""Waiting for a run's stages: a backfill run in stages, so a backlog piles up in the broker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from bench.harness import BenchError, World
from bench.tracking import RunRecord


def reconciled_all(record: RunRecord) -> bool:
    """Both pollers are done and every message they published has been reconciled."""
    return record.tracker.reconciled_all


async def until(condition: Callable[[], bool], *, world: World, timeout_s: float,
                what: str) -> None:
    """Until ``condition`` holds; fails when a process of the world exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        world.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"{what} did not happen in {timeout_s:.0f} s")
        await asyncio.sleep(0.2)
