"""The writer killed at each of its crash windows (failpoints) and started again: the final
state on both sides is right, and it recognises its own earlier write on redelivery (no write
is lost, none is made twice).

Every service runs as its own ``prefsync run`` process here, as in production.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from common.domain import PreferenceKey
from common.domain.rows import key_tuple
from common.store import open_store
from common.store.batch_reads import BatchReads

from .conftest import make_world

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.mark.parametrize("side", ["dotdigital", "dynamics"])
@pytest.mark.parametrize("failpoint", ["writer.after-begin", "writer.after-vendor-write",
                                       "writer.after-commit"])
async def test_writer_killed_at_a_failpoint_neither_loses_nor_repeats_a_write(
        tmp_path: Path, failpoint: str, side: str) -> None:
    async with make_world(tmp_path, records=24) as world:
        await world.spawn_all()
        await world.sync(timeout_s=120)
        # Changes on the other side, so that the writes go to ``side``; opt-outs among them.
        edits: list[tuple[str, int, bool]] = []
        for i, person in enumerate(world.people[:6]):
            preference = world.preferences[i % len(world.preferences)]
            dynamics, dotdigital = await world.values(person.email, preference.id)
            current = dotdigital if side == "dotdigital" else next(iter(dynamics))
            wanted = not current if current is not None else bool(i % 2)
            if side == "dotdigital":
                await world.edit_dynamics(person.email, preference.id, wanted)
            else:
                await world.edit_dotdigital(person.email, preference.id, wanted)
            edits.append((person.email, preference.id, wanted))
        writer = world.processes["writer"]
        writer.kill()
        await writer.wait()
        # not waited for until it consumes: with commands queued already it may reach the point
        # (and exit) before it is seen consuming
        dying = await world.spawn("writer", failpoints=failpoint, wait=False)
        before = (await world.stats(side))["writes_applied"]
        run = asyncio.create_task(world.sync(timeout_s=180))
        assert await asyncio.wait_for(dying.wait(), timeout=120) == 137  # died at the point
        await world.spawn("writer")
        summary = await run
        assert summary["failed"] == 0, summary
        await world.sync(timeout_s=120)
        for email, preference_id, wanted in edits:
            assert await world.values(email, preference_id) == ({wanted}, wanted), email
        # Each change written once: the restarted writer recognised what the dead one wrote.
        assert (await world.stats(side))["writes_applied"] - before == len(edits)
        # The dead round's write batch was ended by the round that wrote its keys again.
        async with open_store(world.config.store.url) as store:
            snapshot = await store.read_batch(BatchReads(
                account=world.account, states_of=[key_tuple(PreferenceKey(
                    account=world.account, email=email, preference_id=preference_id))
                    for email, preference_id, _ in edits]))
        assert snapshot.write_batches == []
