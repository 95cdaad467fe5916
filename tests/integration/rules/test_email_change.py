"""A Dynamics record's email changes: by default the preferences belong to the email (the new
email starts from what dotdigital holds for it, the old email keeps its own); with
``on_email_change = "carry"`` the old email's preferences go with the record to the new email."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from ..pipeline.conftest import World, make_world
from .conftest import Vendors, synced, vendors

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def move(world: World, org: Vendors, *, new_email: str,
               new_values: dict[int, bool]) -> tuple[str, str, dict[int, bool]]:
    """A contact's email changes to one dotdigital already knows (with ``new_values``, set
    before the change). Returns (record id, old email, the old email's values)."""
    person = next(p for p in world.people[10:] if p.kind == "contact")
    (record, values), = (await org.record_values(person.email)).items()
    await org.dotdigital.patch_contact_v3(new_email, preferences=new_values)
    # later than dotdigital's values: made with the Dynamics clock 3 s on, then put back (a
    # clock still ahead when prefsync measures it would be corrected for)
    await world.set_clock("dynamics", {"offset_s": 3})
    await org.set_record("contact", record, {"emailaddress1": new_email})
    await world.set_clock("dynamics", {})
    await synced(world)
    return record, person.email, values


async def newer_rows(world: World, org: Vendors, *, new_email: str
                     ) -> tuple[str, str, dict[int, bool], dict[int, bool]]:
    """A contact whose record's rows are set after ``new_email``'s values are (in dotdigital),
    each to the other value: newer, but made for its own email. Returns (record id, its email,
    the new email's values, the record's)."""
    ids = [p.id for p in world.preferences]
    person = next(p for p in world.people[10:] if p.kind == "contact")
    (record, _), = (await org.record_values(person.email)).items()
    theirs = {pid: i % 2 == 0 for i, pid in enumerate(ids)}
    await org.dotdigital.patch_contact_v3(new_email, preferences=theirs)
    mine = {pid: not value for pid, value in theirs.items()}
    for pid, value in mine.items():
        await org.subscribe("contact", record, pid, value)
    await synced(world)
    return record, person.email, theirs, mine


async def test_by_default_the_new_email_starts_from_its_own_preferences(
        world: World, org: Vendors) -> None:
    new_email = "moved.fresh@example.com"
    ids = [p.id for p in world.preferences]
    person = next(p for p in world.people[10:] if p.kind == "contact")
    old_dotdigital = await world.dotdigital_values(person.email)
    theirs = {pid: not old_dotdigital.get(pid, False) for pid in ids}
    record, old_email, _ = await move(world, org, new_email=new_email, new_values=theirs)
    assert old_email == person.email
    # The record now holds the new email's preferences; the old email keeps its own.
    assert (await org.record_values(new_email))[record] == theirs
    assert await world.dotdigital_values(new_email) == theirs
    assert await world.dotdigital_values(old_email) == old_dotdigital


async def test_the_moved_records_own_rows_never_compete_for_the_new_email(
        world: World, org: Vendors) -> None:
    # The record's rows were changed after the new email's values were set: newer, but made
    # for the old email. They stay the old email's; the record gets the new email's values.
    new_email = "moved.newer.rows@example.com"
    record, email, theirs, mine = await newer_rows(world, org, new_email=new_email)
    assert await world.dotdigital_values(email) == mine
    moved, old_email, _ = await move(world, org, new_email=new_email, new_values=theirs)
    assert (moved, old_email) == (record, email)
    assert (await org.record_values(new_email))[record] == theirs
    assert await world.dotdigital_values(new_email) == theirs
    assert await world.dotdigital_values(old_email) == mine


async def test_carry_copies_the_old_emails_preferences_to_the_new_email(tmp_path: Path) -> None:
    async with make_world(tmp_path) as world:
        account = replace(world.config.account(world.account), on_email_change="carry")
        world.config = replace(world.config, accounts=(account,))
        await world.start()
        await synced(world)
        async with vendors(world) as org:
            ids = [p.id for p in world.preferences]
            person = next(p for p in world.people[10:] if p.kind == "contact")
            before = await world.dotdigital_values(person.email)
            theirs = {pid: not before.get(pid, False) for pid in ids}
            record, old_email, values = await move(
                world, org, new_email="moved.carry@example.com", new_values=theirs)
            assert values  # the old email had preferences to carry
            # Both sides of the new email now hold the old email's preferences (the ones the
            # old email never set keep the new email's values) ...
            expected = {**theirs, **values}
            assert (await org.record_values("moved.carry@example.com"))[record] == expected
            assert await world.dotdigital_values("moved.carry@example.com") == expected
            # ... and the old email still holds them too.
            assert await world.dotdigital_values(old_email) == before


async def test_a_record_that_joins_a_suppressed_contacts_email_still_receives_its_preferences(
        world: World, org: Vendors) -> None:
    # Read while the contact is suppressed, the record's rows are parked until it resubscribes;
    # they must come back as the record joining the email, not as the email's newest change
    # (which would opt the person back in on dotdigital with the old email's values).
    new_email = "moved.suppressed@example.com"
    record, email, theirs, mine = await newer_rows(world, org, new_email=new_email)
    await org.set_status(new_email, "Unsubscribed")
    await synced(world)  # the suppression is read
    await world.set_clock("dynamics", {"offset_s": 3})
    await org.set_record("contact", record, {"emailaddress1": new_email})
    await world.set_clock("dynamics", {})
    await synced(world)  # the record's rows are read, and parked
    assert (await org.record_values(new_email))[record] == mine  # left alone meanwhile
    await org.set_status(new_email, "Subscribed")
    await synced(world)
    assert (await org.record_values(new_email))[record] == theirs
    assert await world.dotdigital_values(new_email) == theirs
    assert await world.dotdigital_values(email) == mine
