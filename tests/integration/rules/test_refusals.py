"""Writes the vendor refuses because something changed between prefsync's read and its write:
a dotdigital contact suppressed, a Dynamics record deactivated, qualified or deleted. None of
them is a failure: the run succeeds, nothing is dead-lettered, and the rule is the one that
holds when the change is already known (suppressed: parked until resubscribed; a record no
longer writable: skipped, the email's other records written)."""

from __future__ import annotations

import asyncio

import aio_pika
import pytest

from common.messaging.topology import Topology, shard_of
from common.store import open_store

from ..pipeline.conftest import BROKER_URL, World
from ..pipeline.test_crash import count_calls, wait_for_calls
from .conftest import Vendors, history, prefs, synced

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def dead_letters(world: World) -> int:
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(Topology.dead_letter_queue(world.account),
                                            passive=True)
        return queue.declaration_result.message_count or 0


async def decisions(world: World, email: str) -> set[tuple[int, str, str]]:
    return {(h["preference_id"], h["side"], h["decision"]) for h in await history(world, email)}


async def hold_then(world: World, side: str, call: str) -> asyncio.Task[dict[str, object]]:
    """Start a sync whose ``call`` (the write) the vendor holds for a moment before applying
    it; returns once the call has reached the vendor."""
    await world.faults(side, {"latency_ms": {call: 1500}})
    before = await count_calls(world, side, call)
    run = asyncio.create_task(world.sync())
    await wait_for_calls(world, side, call, before)
    return run


@pytest.mark.parametrize("contacts", [1, 3], ids=["preferences-put", "v3-import"])
async def test_a_contact_suppressed_between_read_and_write_is_suppressed_not_failed(
        world: World, org: Vendors, contacts: int) -> None:
    # A dotdigital contact unsubscribes; its preference is changed in Dynamics; sync-now. (One
    # contact is written with the preferences PUT, several with a v3 import.)
    shards = world.config.broker.shards
    victim = world.people[5]
    same_shard = [p for p in world.people[6:]
                  if shard_of(p.email, shards) == shard_of(victim.email, shards)]
    people = [victim, *same_shard[:contacts - 1]]
    preference = world.preferences[0]
    wanted: dict[str, bool] = {}
    before: dict[str, bool | None] = {}
    for person in people:
        _, before[person.email] = await world.values(person.email, preference.id)
        wanted[person.email] = not before[person.email] if before[person.email] is not None \
            else False
        await world.edit_dynamics(person.email, preference.id, wanted[person.email])
    write = "PUT /v2/contacts" if contacts == 1 else "PUT /contacts/v3/import"
    run = await hold_then(world, "dotdigital", write)
    await org.set_status(victim.email, "Unsubscribed")  # after the read, before the write
    summary = await run
    await world.faults("dotdigital", None)

    assert summary["failed"] == 0, summary
    assert await dead_letters(world) == 0
    assert await world.values(victim.email, preference.id) == (
        {wanted[victim.email]}, before[victim.email])
    for person in people[1:]:
        assert await world.values(person.email, preference.id) == (
            {wanted[person.email]}, wanted[person.email])
    assert (await prefs(world, victim.email))["dotdigital_contact"]["suppressed"]
    assert (preference.id, "dotdigital", "suppressed") in await decisions(world, victim.email)
    summary = await synced(world)  # the suppression is known now: nothing tried, nothing failed
    assert await world.values(victim.email, preference.id) == (
        {wanted[victim.email]}, before[victim.email])

    # Resubscribed: the value that was refused goes out.
    await org.set_status(victim.email, "Subscribed")
    await synced(world)
    assert await world.values(victim.email, preference.id) == (
        {wanted[victim.email]}, wanted[victim.email])
    assert await dead_letters(world) == 0


@pytest.mark.parametrize("change", ["deactivate-contact", "qualify-lead", "delete-lead"])
async def test_a_record_no_longer_writable_is_skipped_and_the_email_still_written(
        world: World, org: Vendors, change: str) -> None:
    person = next(p for p in world.people if p.kind == "contact")
    lead = await org.create_record("lead", person.email)
    await org.add_to_list("lead", lead)
    await synced(world)
    contact = next(r for r in await org.record_values(person.email) if r != lead)
    preference = world.preferences[2]
    _, dd = await world.values(person.email, preference.id)
    wanted = not dd if dd is not None else False
    await world.set_clock("dotdigital", {"offset_s": 2})
    await world.edit_dotdigital(person.email, preference.id, wanted)
    run = await hold_then(world, "dynamics", "POST /api/data/v9.2/$batch")
    # after the record was read, before the write reaches it
    if change == "deactivate-contact":
        victim, survivor = contact, lead
        await org.set_record("contact", contact, {"statecode": 1, "statuscode": 2})
    elif change == "qualify-lead":
        victim, survivor = lead, contact
        await org.set_record("lead", lead, {"statecode": 1, "statuscode": 3})
    else:
        victim, survivor = lead, contact
        await org.dataverse.delete("leads", lead)
    before = (await org.record_values(person.email)).get(victim)
    summary = await run
    await world.faults("dynamics", None)

    assert summary["failed"] == 0, summary
    assert await dead_letters(world) == 0
    records = await org.record_values(person.email)
    assert records[survivor][preference.id] == wanted
    assert records.get(victim) == before  # untouched (or gone)
    decision = "no-record" if change == "delete-lead" else "read-only"
    assert (preference.id, "dynamics", decision) in await decisions(world, person.email)
    async with open_store(world.config.store.url) as store:
        known = {r.record_id: r for r in
                 (await store.records_for_emails(world.account, [person.email]))[person.email]}
    if change == "delete-lead":
        assert victim not in known  # forgotten in the record directory
    else:
        assert not known[victim].active
    # Converged: the record is not tried again.
    summary = await synced(world)
    assert summary["applied_to_dynamics"] == 0, summary
    assert await dead_letters(world) == 0
