"""SIGKILL a service mid-run and start it again: nothing is lost, final states are right.

Every service runs as its own ``prefsync run`` process here, as in production.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from .conftest import World, make_world

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def wait_for_calls(world: World, side: str, prefix: str, more_than: int) -> None:
    """Until the simulator has answered (or is answering) more than ``more_than`` such calls."""
    await world.until_calls(
        side, lambda calls: sum(n for k, n in calls.items() if k.startswith(prefix)) > more_than,
        what=f"no {prefix} call reached {side}")


async def count_calls(world: World, side: str, prefix: str) -> int:
    calls = (await world.stats(side))["calls"]
    return sum(n for k, n in calls.items() if k.startswith(prefix))


async def crash_and_recover(world: World, victim: str,
                            hold: Callable[[], Awaitable[None]], prefix: tuple[str, str]) -> None:
    await world.spawn_all()
    await world.sync(timeout_s=120)
    edits = []
    for i, person in enumerate(world.people[:24]):
        preference = world.preferences[i % len(world.preferences)]
        _, current = await world.values(person.email, preference.id)
        wanted = not current if current is not None else bool(i % 2)
        await world.edit_dynamics(person.email, preference.id, wanted)
        edits.append((person.email, preference.id, wanted))
    side, call = prefix
    before = await count_calls(world, side, call)
    await hold()
    run = asyncio.create_task(world.sync(timeout_s=180))
    await wait_for_calls(world, side, call, before)
    process = world.processes[victim]
    process.send_signal(signal.SIGKILL)
    await process.wait()
    await world.faults("dotdigital", None)
    await world.faults("dynamics", None)
    await world.spawn(victim)
    summary = await run
    assert summary["failed"] == 0, summary
    await world.sync(timeout_s=120)
    for email, preference_id, wanted in edits:
        assert await world.values(email, preference_id) == ({wanted}, wanted), email


async def test_writer_killed_mid_batch(tmp_path: Path) -> None:
    async with make_world(tmp_path, records=40) as world:
        async def hold() -> None:
            await world.faults("dotdigital", {"latency_ms": {"PUT /contacts/v3/import": 1500,
                                                             "PUT /v2/contacts": 1500}})
        await crash_and_recover(world, "writer", hold, ("dotdigital", "PUT /"))


async def test_reconciler_killed_mid_run(tmp_path: Path) -> None:
    async with make_world(tmp_path, records=40) as world:
        async def hold() -> None:
            # Slow writes keep the run going while the reconciler has work in hand.
            await world.faults("dotdigital", {"latency_ms": {"GET /v2/contacts/with-preference": 300}})
        await crash_and_recover(world, "reconciler", hold,
                                ("dotdigital", "GET /v2/contacts/with-preference"))


async def test_poller_killed_mid_read(tmp_path: Path) -> None:
    async with make_world(tmp_path, records=40) as world:
        async def hold() -> None:
            await world.faults("dynamics", {"latency_ms": {
                "GET /api/data/v9.2/psync_marketingpreferencesubscriptions": 1500}})
        await crash_and_recover(world, "dynamics-poller", hold,
                                ("dynamics", "GET /api/data/v9.2/psync_marketingpreferencesub"))
