"""End to end through all four services: both simulators, RabbitMQ, the ledger."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest

from common.messaging.topology import CHANGES_EXCHANGE, Topology

from .conftest import BROKER_URL, World

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def converge(world: World) -> dict[str, Any]:
    """The first run brings both sides together; the result is checked by the caller."""
    summary = await world.sync()
    assert summary["failed"] == 0, summary
    return summary


async def test_first_sync_converges_both_sides(world: World) -> None:
    await world.start()
    summary = await converge(world)
    assert summary["read"]["dynamics"] > 0 and summary["read"]["dotdigital"] > 0
    for person in world.people[:10]:
        records = await world.dynamics_values(person.email)
        dotdigital = await world.dotdigital_values(person.email)
        for states in records.values():
            for preference in world.preferences:
                # Whatever either side held explicitly, both now hold the same value.
                if preference.id in states or preference.id in dotdigital:
                    assert states.get(preference.id) == dotdigital.get(preference.id), (
                        person.email, preference.id)


@pytest.mark.parametrize(("side", "other", "person", "preference", "when_unset"), [
    ("dynamics", "dotdigital", 3, 0, True),
    ("dotdigital", "dynamics", 5, 1, False),
])
async def test_a_change_on_one_side_reaches_the_other(world: World, side: str, other: str,
                                                      person: int, preference: int,
                                                      when_unset: bool) -> None:
    await world.start()
    await converge(world)
    email, preference_id = world.people[person].email, world.preferences[preference].id
    _, before = await world.values(email, preference_id)
    wanted = not before if before is not None else when_unset
    await world.edit(side, email, preference_id, wanted)
    summary = await world.sync()
    assert summary[f"applied_to_{other}"] >= 1, summary
    assert await world.values(email, preference_id) == ({wanted}, wanted)


async def test_both_changed_the_newer_wins(world: World) -> None:
    await world.start()
    await converge(world)
    email = world.people[7].email
    # Dynamics changes first, then dotdigital; and the other way round on another preference.
    cases = (("dynamics", "dotdigital", False), ("dotdigital", "dynamics", True))
    for (first, later, wanted), preference in zip(cases, world.preferences, strict=False):
        await world.edit(first, email, preference.id, not wanted)
        # ten seconds later: made with its clock ten seconds on, then put back (a clock still
        # ahead when prefsync measures it is corrected for, see test_clock.py)
        await world.set_clock(later, {"offset_s": 10})
        await world.edit(later, email, preference.id, wanted)
        await world.set_clock(later, {})
        await world.sync()
        assert await world.values(email, preference.id) == ({wanted}, wanted), later


@pytest.mark.parametrize("dynamics_value", [True, False])
async def test_a_tie_goes_to_opt_out(world: World, dynamics_value: bool) -> None:
    await world.start()
    await converge(world)
    person, preference = world.people[9], world.preferences[2]
    instant = (datetime.now(UTC) + timedelta(seconds=30)).replace(microsecond=0)
    await world.set_clock("dynamics", {"freeze_at": instant.isoformat()})
    await world.set_clock("dotdigital", {"freeze_at": instant.isoformat()})
    await world.edit_dynamics(person.email, preference.id, dynamics_value)
    await world.edit_dotdigital(person.email, preference.id, not dynamics_value)
    await world.set_clock("dynamics", {"offset_s": 31})
    await world.set_clock("dotdigital", {"offset_s": 31})
    await world.sync()
    assert await world.values(person.email, preference.id) == ({False}, False)


async def test_a_converged_sync_writes_nothing(world: World) -> None:
    await world.start()
    await converge(world)
    await world.sync()  # echoes of the first run's writes are read back here
    dyn_before = (await world.stats("dynamics"))["writes_applied"]
    dd_before = (await world.stats("dotdigital"))["writes_applied"]
    summary = await world.sync()
    assert summary["applied_to_dotdigital"] == summary["applied_to_dynamics"] == 0, summary
    assert (await world.stats("dynamics"))["writes_applied"] == dyn_before
    assert (await world.stats("dotdigital"))["writes_applied"] == dd_before


async def test_an_idle_sync_costs_one_dotdigital_call_per_feed(world: World) -> None:
    """3 preferences: each preference's opt-ins, the suppressions and the contacts modified
    since; no server-time. The tree is read in a run once it is preference_tree_max_age_s
    old, once (by the dynamics-poller, for both pollers)."""
    await world.start()
    await converge(world)
    await converge(world)  # echoes of the first run's writes are read back here

    async def calls_of_a_sync() -> dict[str, int]:
        before = (await world.stats("dotdigital"))["calls"]
        await converge(world)
        after = (await world.stats("dotdigital"))["calls"]
        return {route: n - before.get(route, 0) for route, n in after.items()
                if n != before.get(route, 0)}

    feeds = {"GET /v2/contacts/with-preference/{preference_id}/opt-ins-since/{date}": 3,
             "GET /v2/contacts/suppressed-since/{date}": 1,
             "GET /contacts/v3": 1}
    made = await calls_of_a_sync()
    assert made == feeds, made
    await world.age_preference_tree()
    made = await calls_of_a_sync()
    assert made == {"GET /v2/preferences": 1, **feeds}, made


async def test_flip_flop_newest_value_wins_on_both_sides(world: World) -> None:
    """A Dynamics change made while our write of an older value to dotdigital is in flight
    still wins on both sides: the read-back of our write is recognised as an echo."""
    await world.start()
    await converge(world)
    person, preference = world.people[12], world.preferences[0]
    await world.edit_dynamics(person.email, preference.id, True)
    # Hold the dotdigital write in flight for two seconds.
    await world.faults("dotdigital", {"latency_ms": {"PUT /v2/contacts": 2000,
                                                     "PUT /contacts/v3/import": 2000}})
    first = asyncio.create_task(world.sync())
    writes_before = (await world.stats("dotdigital"))["calls"]
    # Wait until the write request has reached dotdigital (it is counted on arrival).
    await world.until_calls("dotdigital", lambda calls: any(
        k.startswith(("PUT /v2/contacts", "PUT /contacts/v3/import"))
        and calls.get(k, 0) > writes_before.get(k, 0) for k in calls),
        what="the write never reached dotdigital", timeout_s=15)
    await world.set_clock("dynamics", {"offset_s": 1})
    await world.edit_dynamics(person.email, preference.id, False)  # newer, while in flight
    await first
    await world.faults("dotdigital", None)
    await world.sync()
    await world.sync()
    assert await world.values(person.email, preference.id) == ({False}, False)


async def test_malformed_message_is_dead_lettered_and_sync_goes_on(world: World) -> None:
    await world.start()
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(CHANGES_EXCHANGE)
        await exchange.publish(aio_pika.Message(b'{"v": 1, "type": "preference-changes"}',
                                                message_id="garbage"),
                               routing_key=Topology.changes_key(world.account, 0))
        summary = await world.sync()
        assert summary["failed"] == 0
        dlq = await channel.get_queue(Topology.dead_letter_queue(world.account))
        async with dlq.iterator() as messages:
            async for message in messages:
                assert message.message_id == "garbage"
                assert "missing field" in str(message.headers["x-prefsync-reason"])
                await message.ack()
                break


async def test_a_row_created_behind_our_back_is_read_not_duplicated(world: World) -> None:
    """The writer goes to create a Dynamics row that a user created after the poller's read:
    Dataverse refuses the duplicate, the writer reads the row, and the newer value wins."""
    await world.start()
    await converge(world)
    # someone with neither side set for a preference
    unset = [(person, p) for person in world.people[:20] for p in world.preferences
             if await world.values(person.email, p.id) == ({None}, None)]
    if not unset:
        pytest.skip("every seeded person has every preference set somewhere")
    person, preference = unset[0]
    await world.edit_dotdigital(person.email, preference.id, True)
    # Hold our $batch write in flight; the user creates the row while it is held.
    await world.faults("dynamics", {"latency_ms": {"POST /api/data/v9.2/$batch": 1500}})
    # the poller's own batch (its eligibility reads) comes first, then the write's
    batches = (await world.stats("dynamics"))["calls"].get("POST /api/data/v9.2/$batch", 0) + 1
    run = asyncio.create_task(world.sync())
    await world.until_calls(
        "dynamics", lambda calls: calls.get("POST /api/data/v9.2/$batch", 0) > batches,
        what="the write never reached Dataverse", timeout_s=15)
    await world.set_clock("dynamics", {"offset_s": 5})
    await world.edit_dynamics(person.email, preference.id, False)
    summary = await run
    await world.faults("dynamics", None)
    assert summary["failed"] == 0, summary
    # the create met the user's row (DuplicateRecord) and was not retried forever
    assert (await world.stats("dynamics"))["statuses"].get("412", 0) >= 1
    await world.sync()
    assert await world.values(person.email, preference.id) == ({False}, False)
