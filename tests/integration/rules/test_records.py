"""Who syncs: records keyed by email (a contact and a lead with one email hold the same
preferences), and only records that have ever been in an email-activated marketing list."""

from __future__ import annotations

import pytest

from ..pipeline.conftest import World
from .conftest import Vendors, history, prefs, synced

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_records_sharing_an_email_hold_the_same_preferences(world: World,
                                                                  org: Vendors) -> None:
    person = next(p for p in world.people if p.kind == "contact")
    email = person.email.upper()  # the key is the trimmed, case-folded address
    lead = await org.create_record("lead", email)
    await org.add_to_list("lead", lead)
    await synced(world)
    # The lead joined the email: it now holds the email's preferences.
    records = await org.record_values(person.email)
    assert len(records) == 2 and lead in records
    contact_values, lead_values = (records[r] for r in sorted(records, key=lambda r: r == lead))
    assert lead_values == contact_values and lead_values

    # A change on the lead is a change for the email: the contact and dotdigital follow.
    preference = world.preferences[0]
    wanted = not lead_values.get(preference.id, True)
    await world.set_clock("dynamics", {"offset_s": 2})
    await org.subscribe("lead", lead, preference.id, wanted)
    summary = await synced(world)
    assert summary["applied_to_dynamics"] >= 1 and summary["applied_to_dotdigital"] >= 1
    assert await world.values(person.email, preference.id) == ({wanted}, wanted)

    # A dotdigital change is written to both records, each row getting its own version.
    other = world.preferences[1]
    _, before_other = await world.values(person.email, other.id)
    await world.set_clock("dotdigital", {"offset_s": 4})
    await world.edit_dotdigital(person.email, other.id, not before_other)
    summary = await synced(world)
    assert summary["applied_to_dynamics"] >= 1, summary  # counted per preference
    assert await world.values(person.email, other.id) == ({not before_other}, not before_other)

    # The writes to each row are read back as our own (by each row's version): nothing more
    # is written.
    await synced(world)
    before = (await world.stats("dynamics"))["writes_applied"]
    summary = await synced(world)
    assert summary["applied_to_dynamics"] == summary["applied_to_dotdigital"] == 0, summary
    assert (await world.stats("dynamics"))["writes_applied"] == before
    entries = await history(world, person.email)
    decisions = [(h["side"], h["decision"]) for h in entries if h["preference_id"] == preference.id]
    assert ("dynamics", "applied") in decisions and ("dynamics", "echo") in decisions
    echoes = {h["change_id"].split(":")[1] for h in entries
              if (h["preference_id"], h["side"], h["decision"]) == (other.id, "dynamics", "echo")}
    assert len(echoes) == 2  # one echo per subscription row (change ids name the row)


async def test_newer_change_on_either_record_wins_for_the_email(world: World,
                                                                org: Vendors) -> None:
    person = next(p for p in world.people if p.kind == "contact")
    lead = await org.create_record("lead", person.email)
    await org.add_to_list("lead", lead)
    await synced(world)
    preference = world.preferences[1]
    records = await org.record_values(person.email)
    contact = next(r for r in records if r != lead)
    # Both records change in one run; the lead's change is the later one.
    await world.set_clock("dynamics", {"offset_s": 2})
    await org.subscribe("contact", contact, preference.id, True)
    await world.set_clock("dynamics", {"offset_s": 4})
    await org.subscribe("lead", lead, preference.id, False)
    await synced(world)
    assert await world.values(person.email, preference.id) == ({False}, False)


async def test_records_never_in_a_list_are_never_read_nor_written(world: World,
                                                                  org: Vendors) -> None:
    email = "newcomer@example.com"
    preference = world.preferences[0]
    await org.dotdigital.patch_contact_v3(email, preferences={preference.id: False})
    contact = await org.create_record("contact", email)
    # The Dynamics change is the later one: made with its clock 2 s on, which is then put back
    # (a clock still ahead when prefsync measures it would be corrected for).
    await world.set_clock("dynamics", {"offset_s": 2})
    await org.subscribe("contact", contact, preference.id, True)
    await world.set_clock("dynamics", {})
    summary = await synced(world)
    assert summary["outcomes"].get("ineligible", 0) >= 1, summary
    # Neither side was written, and nothing was read into the ledger ...
    assert await world.values(email, preference.id) == ({True}, False)
    view = await prefs(world, email)
    assert not view["eligible"]
    assert {p["status"] for p in view["preferences"]} == {"not set"}
    # ... but both changes seen are on record as ineligible.
    seen = {(h["side"], h["decision"]) for h in await history(world, email)}
    assert seen == {("dynamics", "ineligible"), ("dotdigital", "ineligible")}

    # Added to a list later: its current preferences sync (the newer one wins).
    await org.add_to_list("contact", contact)
    await synced(world)
    assert await world.values(email, preference.id) == ({True}, True)
    assert (await prefs(world, email))["eligible"]


async def test_a_record_removed_from_the_list_keeps_syncing(world: World, org: Vendors) -> None:
    person = next(p for p in world.people if p.kind == "lead")
    records = await org.record_values(person.email)
    (lead,) = records
    await org.remove_from_list("lead", lead)
    preference = world.preferences[2]
    _, before = await world.values(person.email, preference.id)
    wanted = not before if before is not None else True
    await world.set_clock("dynamics", {"offset_s": 2})
    await world.edit_dynamics(person.email, preference.id, wanted)
    await synced(world)
    assert await world.values(person.email, preference.id) == ({wanted}, wanted)
    await world.set_clock("dotdigital", {"offset_s": 4})
    await world.edit_dotdigital(person.email, preference.id, not wanted)
    await synced(world)
    assert await world.values(person.email, preference.id) == ({not wanted}, not wanted)


async def test_a_record_new_to_dotdigital_gets_its_contact_there(world: World,
                                                                 org: Vendors) -> None:
    """A small sync to an email dotdigital has no contact for: it is created with the value
    (the per-contact write is refused as not found; the import creates the contact)."""
    email = "new-to-dotdigital@example.com"
    preference = world.preferences[0]
    record = await org.create_record("contact", email)
    await org.add_to_list("contact", record)
    await org.subscribe("contact", record, preference.id, False)
    summary = await synced(world)
    assert summary["failed"] == 0, summary
    assert await world.values(email, preference.id) == ({False}, False)
