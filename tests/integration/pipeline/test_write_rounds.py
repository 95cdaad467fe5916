"""What k small changes, spread over the shards, cost the writer in vendor calls: one write round
for them all (common.messaging.rounds), counted by the simulators (``GET /_sim/stats``).

The writer's calls are what a sync with k changes costs the side written, less what a sync with
nothing changed costs it (the pollers' reads)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from .conftest import World, make_world

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

K = 20
SHARDS = 4
FEED = "GET /v2/contacts/with-preference/{preference_id}/opt-ins-since/{date}"
BATCH = "POST /api/data/v9.2/$batch"


async def calls(world: World, side: str) -> Counter[str]:
    return Counter((await world.stats(side))["calls"])


async def writers_calls(world: World, *, written: str, edited: str,
                        emails: list[str]) -> Counter[str]:
    """The calls to ``written`` of a sync after ``emails`` changed on ``edited``, less those of a
    sync with nothing changed, just before."""
    preference = world.preferences[0].id
    wanted = {}
    for email in emails:
        dynamics, dotdigital = await world.values(email, preference)
        wanted[email] = not (dotdigital if edited == "dotdigital" else next(iter(dynamics)))
    before = await calls(world, written)
    await world.sync()
    idle = await calls(world, written) - before
    for email in emails:
        await world.edit(edited, email, preference, wanted[email])
    before = await calls(world, written)
    summary = await world.sync()
    busy = await calls(world, written) - before
    assert summary[f"applied_to_{written}"] == len(emails), summary
    for email in emails:
        dynamics, dotdigital = await world.values(email, preference)
        assert dynamics == {wanted[email]} and dotdigital == wanted[email]
    busy.subtract(idle)
    return +busy


async def test_k_changes_from_every_shard_cost_one_round(tmp_path: Path) -> None:
    async with make_world(tmp_path, records=3 * K, preferences=1, shards=SHARDS) as world:
        await world.start()
        await world.sync()
        await world.sync()  # the first sync's echoes
        people = [p.email for p in world.people]

        into_dotdigital = await writers_calls(world, written="dotdigital", edited="dynamics",
                                              emails=people[:K])
        into_dynamics = await writers_calls(world, written="dynamics", edited="dotdigital",
                                            emails=people[K:2 * K])

    # one read of the preference's feed, one import and its status poll; never a server-time
    assert into_dotdigital[FEED] == 1
    assert into_dotdigital["PUT /contacts/v3/import"] == 1
    assert into_dotdigital["GET /v2/server-time"] == 0
    assert 1 <= into_dotdigital["GET /contacts/v3/import/{import_id}"] <= 2
    assert sum(into_dotdigital.values()) <= 4, into_dotdigital
    # one $batch holding the k rows' writes (each also counted under its own route)
    assert into_dynamics[BATCH] == 1, into_dynamics
