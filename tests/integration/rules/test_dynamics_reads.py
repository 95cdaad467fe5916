"""What the dynamics-poller asks of Dataverse: an idle run costs one request per feed (read from
the simulator's own counters), and what it no longer re-reads in full every run (list members,
the preference catalog) is still seen when it changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bench.figures import batched_delta, call_delta
from common.store import open_store
from common.store.checkpoints import EMAIL_LISTS
from common.vendors.dataverse.catalog import PREFERENCE_KEY, PREFERENCES

from ..pipeline.conftest import World
from .conftest import Vendors, prefs, synced

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

API = "/api/data/v9.2"
MEMBERS_IN_FULL = f"GET {API}/lists({{key}})/{{nav}}"
# The feeds of an idle run: four change-tracking reads, the catalog's, and one $batch holding
# the email-activated lists and the list members created since the last run.
IDLE = {f"GET {API}/{entity_set}": 1 for entity_set in (
    "psync_marketingpreferences", "contacts", "leads", "accounts",
    "psync_marketingpreferencesubscriptions")} | {f"POST {API}/$batch": 1}
IDLE_BATCHED = {f"GET {API}/lists": 1, f"GET {API}/listmembers": 1}


async def dynamics_calls(world: World) -> tuple[dict[str, int], dict[str, int]]:
    """Dataverse requests per route of one sync, and the operations inside its batches."""
    before = await world.stats("dynamics")
    await synced(world)
    after = await world.stats("dynamics")
    return call_delta(before, after), batched_delta(before, after)


async def test_an_idle_run_costs_dataverse_one_request_per_feed(world: World) -> None:
    await synced(world)  # reads back what the first run wrote
    calls, batched = await dynamics_calls(world)
    assert (calls, batched) == (IDLE, IDLE_BATCHED)
    assert sum(calls.values()) == 6


async def test_a_record_added_to_an_email_activated_list_later_syncs(world: World,
                                                                    org: Vendors) -> None:
    email = "joins-later@example.com"
    preference = world.preferences[1]
    record = await org.create_record("contact", email)
    await world.set_clock("dynamics", {"offset_s": 2})  # the later change of the two
    await org.subscribe("contact", record, preference.id, True)
    await world.set_clock("dynamics", {})
    await synced(world)
    assert not (await prefs(world, email))["eligible"]
    assert await world.values(email, preference.id) == ({True}, None)

    await org.add_to_list("contact", record)
    calls, batched = await dynamics_calls(world)
    assert (await prefs(world, email))["eligible"]
    assert await world.values(email, preference.id) == ({True}, True)
    # seen among the members created since the last run: no list was read in full
    assert MEMBERS_IN_FULL not in calls
    assert batched == IDLE_BATCHED


async def test_a_list_that_becomes_email_activated_makes_its_members_eligible(
        world: World, org: Vendors) -> None:
    email = "on-a-quiet-list@example.com"
    preference = world.preferences[0]
    created = await org.dataverse.create("lists", {
        "listname": "Trade fair visitors", "createdfromcode": 2, "type": False,
        "psync_emailactivated": False}, return_representation=True)
    assert created.body is not None
    list_id = str(created.body["listid"])
    record = await org.create_record("contact", email)
    await org.dataverse.create(f"lists({list_id})/Microsoft.Dynamics.CRM.AddMemberList",
                               {"EntityId": record})
    await world.set_clock("dynamics", {"offset_s": 2})
    await org.subscribe("contact", record, preference.id, False)
    await world.set_clock("dynamics", {})
    await synced(world)
    assert not (await prefs(world, email))["eligible"]

    await org.dataverse.update("lists", list_id, {"psync_emailactivated": True})
    calls, _ = await dynamics_calls(world)
    assert (await prefs(world, email))["eligible"]
    assert await world.values(email, preference.id) == ({False}, False)
    assert calls[MEMBERS_IN_FULL] == 1  # the newly activated list, once
    calls, _ = await dynamics_calls(world)
    assert MEMBERS_IN_FULL not in calls


async def test_every_list_is_read_in_full_once_a_day(world: World, org: Vendors) -> None:
    """A membership created backdated (as a migration can) is before the point members are
    read from: the daily full read of every email-activated list catches it."""
    email = "migrated-member@example.com"
    record = await org.create_record("contact", email)
    await org.subscribe("contact", record, world.preferences[0].id, True)
    await synced(world)
    await world.set_clock("dynamics", {"offset_s": -3600})
    await org.add_to_list("contact", record)
    await world.set_clock("dynamics", {})
    calls, _ = await dynamics_calls(world)
    assert MEMBERS_IN_FULL not in calls
    assert not (await prefs(world, email))["eligible"]

    def a_day_ago(state: dict[str, Any] | None) -> dict[str, Any]:
        then = datetime.now(UTC) - timedelta(hours=25)
        return {**(state or {}), "read_in_full_at": then.isoformat()}

    async with open_store(world.config.store.url) as store:
        await EMAIL_LISTS.update(store, world.account, a_day_ago)
    calls, _ = await dynamics_calls(world)
    assert calls[MEMBERS_IN_FULL] == 2  # both email-activated lists
    assert (await prefs(world, email))["eligible"]
    assert await world.values(email, world.preferences[0].id) == ({True}, True)
    calls, _ = await dynamics_calls(world)
    assert MEMBERS_IN_FULL not in calls


async def test_a_catalog_change_made_in_dynamics_is_seen_and_mirrored_back(
        world: World, org: Vendors) -> None:
    renamed, deleted = world.preferences[0], world.preferences[1]
    shown = (await org.preference_row(renamed.id))["psync_publicname"]
    await org.dataverse.update(PREFERENCES, str((await org.preference_row(renamed.id))[
        PREFERENCE_KEY]), {"psync_publicname": "Renamed by hand"})
    old_row = str((await org.preference_row(deleted.id))[PREFERENCE_KEY])
    await org.dataverse.delete(PREFERENCES, old_row)

    calls, _ = await dynamics_calls(world)
    assert calls[f"GET {API}/{PREFERENCES}"] == 1  # read once, the changes only
    # dotdigital's tree is the catalog's source: the name is put back, the row made again
    assert (await org.preference_row(renamed.id))["psync_publicname"] == shown
    new_row: dict[str, Any] = await org.preference_row(deleted.id)
    assert new_row[PREFERENCE_KEY] != old_row and new_row["statecode"] == 0

    # The mapping follows the new row: a Dynamics user's change through it reaches dotdigital.
    person = next(p for p in world.people if p.kind == "contact")
    (record,) = await org.record_values(person.email)
    await world.set_clock("dynamics", {"offset_s": 2})
    await org.subscribe("contact", record, deleted.id, True)
    await world.set_clock("dynamics", {})
    await synced(world)
    assert await world.values(person.email, deleted.id) == ({True}, True)
