"""The reconciler killed at its crash windows (failpoints), then started again: stored state that
implies future work is kept until that work's messages are confirmed, so nothing is lost.

Every service runs as its own ``prefsync run`` process here, as in production. The outstanding
work sweep is held back (a long grace period) so that these tests see the windows themselves,
not the safety net behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from common.messaging.topology import CONTROL_EXCHANGE, shard_of
from common.store import open_store
from services.simulators import seeding

from .conftest import BROKER_URL, SEED, World, make_world

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def hold_back_sweep(world: World) -> None:
    """The sweep's grace period, longer than any of these tests."""
    with world.config_path.open("a") as config:
        config.write("\n[sweep]\ngrace_s = 3600\n")


@dataclass
class Progress:
    """The progress events of the account's runs, as ``sync-now --wait`` follows them."""

    events: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def until(self, condition: Callable[[list[dict[str, Any]]], bool],
                    timeout_s: float = 120) -> None:
        async with asyncio.timeout(timeout_s):
            while not condition(self.events):
                self.arrived.clear()
                await self.arrived.wait()


@contextlib.asynccontextmanager
async def progress(world: World) -> AsyncIterator[Progress]:
    seen = Progress()
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(CONTROL_EXCHANGE, ensure=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key=f"{world.account}.progress.#")

        async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            seen.events.append(orjson.loads(message.body))
            seen.arrived.set()
            await message.ack()

        await queue.consume(on_event)
        yield seen


def dynamics_part_reconciled(events: list[dict[str, Any]]) -> bool:
    """The dynamics-poller's run is done and every message it published is reconciled."""
    done = [e for e in events if e.get("event") == "poller-done" and e.get("source") == "dynamics"]
    reconciled = {e.get("message") for e in events if e.get("event") == "reconciled"}
    return bool(done) and set(done[0].get("messages", [])) <= reconciled


async def test_deferred_writes_survive_a_crash_after_they_are_cleared(tmp_path: Path) -> None:
    """Dotdigital writes wait (deferred) until the ec-poller's complete read of their preference
    is reconciled; a reconciler killed right after it clears them (once they are published)
    must not lose them."""
    async with make_world(tmp_path, records=40) as world:
        hold_back_sweep(world)
        shards = world.config.broker.shards
        # Dynamics values where dotdigital holds none: after the complete read dotdigital is
        # still unknown for them, so only the deferred writes bring the values there.
        targets: list[tuple[str, int, bool]] = []
        for i, person in enumerate(world.people):
            for preference in world.preferences:
                if seeding.initial_state(SEED, "dotdigital", person.email, preference.id) is None:
                    wanted = bool(i % 2)
                    await world.edit_dynamics(person.email, preference.id, wanted)
                    targets.append((person.email, preference.id, wanted))
        # whichever marker the reconciler handles first, it has deferred writes of its own
        assert {(p, shard_of(e, shards)) for e, p, _ in targets} == {
            (p.id, s) for p in world.preferences for s in range(shards)}
        async with progress(world) as events:
            await world.spawn("dynamics-poller")
            await world.spawn("writer")
            reconciler = await world.spawn("reconciler",
                                           failpoints="reconciler.after-clear-deferred")
            run = asyncio.create_task(world.sync(timeout_s=240))
            # The ec-poller starts only once the Dynamics side is reconciled: every write to
            # dotdigital is deferred by then (no complete read of any preference yet).
            await events.until(dynamics_part_reconciled)
            async with open_store(world.config.store.url) as store:
                deferred = {(email, p.id) for p in world.preferences
                            for email in await store.deferred_emails(world.account, p.id)}
            assert {(e, p) for e, p, _ in targets} <= deferred
            await world.spawn("ec-poller")
            assert await asyncio.wait_for(reconciler.wait(), 120) == 137
            await world.spawn("reconciler")
            summary = await run
        assert summary["failed"] == 0, summary
        for email, preference_id, wanted in targets:
            assert await world.values(email, preference_id) == ({wanted}, wanted), (
                email, preference_id)


@pytest.mark.parametrize("point", ["reconciler.after-commit", "reconciler.after-unpark"])
async def test_resubscribed_contact_writes_survive_a_crash_before_they_are_published(
        tmp_path: Path, point: str) -> None:
    """A contact resubscribes; the reconciler dies after it committed the batch (the contact is
    no longer suppressed in the ledger), or after it also cleared the parked changes it folded
    in, and before it published: the value parked while the contact was suppressed still
    reaches dotdigital."""
    async with make_world(tmp_path, records=20) as world:
        hold_back_sweep(world)
        for service in ("dynamics-poller", "ec-poller", "writer", "reconciler"):
            await world.spawn(service)
        summary = await world.sync()
        assert summary["failed"] == 0, summary
        person, preference = world.people[4], world.preferences[0]
        _, before = await world.values(person.email, preference.id)
        wanted = not before if before is not None else False

        async def set_status(status: str) -> None:
            await world.set_status(person.email, status)

        async def suppressed() -> bool:
            async with open_store(world.config.store.url) as store:
                contacts = await store.load_contacts(world.account, [person.email])
            return person.email in contacts and contacts[person.email].suppressed

        await set_status("Unsubscribed")
        assert (await world.sync())["failed"] == 0
        assert await suppressed()
        await world.edit_dynamics(person.email, preference.id, wanted)
        summary = await world.sync()
        assert summary["outcomes"].get("suppressed", 0) >= 1, summary
        assert await world.values(person.email, preference.id) == ({wanted}, before)

        old = world.processes["reconciler"]
        old.kill()
        await old.wait()
        reconciler = await world.spawn("reconciler", failpoints=point)
        await set_status("Subscribed")
        run = asyncio.create_task(world.sync(timeout_s=180))
        assert await asyncio.wait_for(reconciler.wait(), 120) == 137
        # it died in the resubscription's batch, after the contact was saved as resubscribed
        assert not await suppressed()
        if point == "reconciler.after-unpark":
            async with open_store(world.config.store.url) as store:  # and the parked cleared
                assert not await store.parked_observations(world.account, {person.email})
        await world.spawn("reconciler")
        summary = await run
        assert summary["failed"] == 0, summary
        assert await world.values(person.email, preference.id) == ({wanted}, wanted)
