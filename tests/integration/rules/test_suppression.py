"""Suppressed dotdigital contacts: neither read nor written on either side while suppressed,
and the sync says so; once resubscribed, their current preferences sync."""

from __future__ import annotations

import asyncio

import pytest

from ..pipeline.conftest import World
from .conftest import Vendors, history, prefs, status, synced

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

# Well beyond the tie band of two measured clocks (Dataverse's whole seconds among them).
RESUBSCRIBED_AFTER_S = 3.0


@pytest.mark.parametrize("suppression", ["Unsubscribed", "HardBounced"])
async def test_suppressed_contact_is_left_alone_until_resubscribed(
        world: World, org: Vendors, suppression: str) -> None:
    person = world.people[4]
    first, second = world.preferences[0], world.preferences[1]
    _, dd_first = await world.values(person.email, first.id)
    dyn_second, dd_second = await world.values(person.email, second.id)
    await org.set_status(person.email, suppression)
    await synced(world)  # the suppression is read
    assert (await prefs(world, person.email))["dotdigital_contact"]["suppressed"]

    # Changes on both sides while suppressed ...
    wanted_first = not dd_first if dd_first is not None else True
    wanted_second = not dd_second if dd_second is not None else False
    await world.set_clock("dynamics", {"offset_s": 2})
    await world.edit_dynamics(person.email, first.id, wanted_first)
    await world.set_clock("dotdigital", {"offset_s": 4})
    await world.edit_dotdigital(person.email, second.id, wanted_second)  # as the contact
    summary = await synced(world)
    # ... are seen, counted and recorded as suppressed, and go nowhere.
    assert summary["outcomes"].get("suppressed", 0) >= 2, summary
    assert await world.values(person.email, first.id) == ({wanted_first}, dd_first)
    assert await world.values(person.email, second.id) == (dyn_second, wanted_second)
    decisions = {(h["preference_id"], h["side"], h["decision"])
                 for h in await history(world, person.email)}
    assert (first.id, "dynamics", "suppressed") in decisions
    assert (second.id, "dotdigital", "suppressed") in decisions
    last = (await status(world))["last_run"]
    assert last is not None and last["counts"]["suppressed"] >= 2

    # Resubscribed: sync resumes with the contact's current preferences, both sides.
    await org.set_status(person.email, "Subscribed")
    await synced(world)
    assert await world.values(person.email, first.id) == ({wanted_first}, wanted_first)
    assert await world.values(person.email, second.id) == ({wanted_second}, wanted_second)
    assert not (await prefs(world, person.email))["dotdigital_contact"]["suppressed"]
    decisions = {(h["preference_id"], h["side"], h["decision"])
                 for h in await history(world, person.email)}
    assert (first.id, "dynamics", "applied") in decisions
    assert (second.id, "dotdigital", "applied") in decisions


async def test_a_future_stamp_parked_while_suppressed_keeps_the_time_it_was_read(
        world: World, org: Vendors) -> None:
    """A Dynamics change stamped far ahead of Dataverse's measured clock is taken as made when
    it was read (time-base rule 7). Read while the contact is suppressed, it is parked; an
    opt-out made on dotdigital after that read still wins once the contact is resubscribed.
    Placed again at the resubscription, the opt-in would be bounded by that later time, look
    newest, and opt the person back in."""
    person = world.people[5]
    preference = world.preferences[0]
    if (await world.values(person.email, preference.id))[1] is not True:
        await world.edit_dotdigital(person.email, preference.id, True)
        await synced(world)
    await org.set_status(person.email, "Unsubscribed")
    await synced(world)
    # Dataverse stamps one change an hour ahead, then its clock is right again.
    await world.set_clock("dynamics", {"offset_s": 3600})
    await world.edit_dynamics(person.email, preference.id, True)
    await world.set_clock("dynamics", {"offset_s": 0})
    await synced(world)  # read, bounded and parked
    await world.edit_dotdigital(person.email, preference.id, False)  # later, as the contact
    await synced(world)
    assert await world.values(person.email, preference.id) == ({True}, False)
    # The person resubscribes later: further from the opt-out than the clocks' tie band. The
    # vendors stamp it by their own clocks, so real time must pass; there is nothing to await.
    await asyncio.sleep(RESUBSCRIBED_AFTER_S)
    await org.set_status(person.email, "Subscribed")
    await synced(world)
    assert await world.values(person.email, preference.id) == ({False}, False)
