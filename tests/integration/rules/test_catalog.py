"""The preference catalog: dotdigital's tree mirrored into Dynamics, per account (read again
once it is ``preference_tree_max_age_s`` old)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common.vendors.dataverse.catalog import entries_of_tree
from common.vendors.dataverse.client import DataverseClient, odata_literal

from ..pipeline.conftest import World, make_worlds
from .conftest import Vendors, prefs, synced, vendors

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def catalog(client: DataverseClient, account: str) -> dict[int, dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    async for page in client.iter_pages("psync_marketingpreferences",
                                        filter=f"psync_ecaccount eq {odata_literal(account)}"):
        for row in page.rows:
            rows[int(row["psync_ecpreferenceid"])] = row
    return rows


def node(tree: list[dict[str, Any]], preference_id: int) -> dict[str, Any]:
    for item in tree:
        for candidate in (item, *(item.get("preferences") or [])):
            if int(candidate["id"]) == preference_id:
                found: dict[str, Any] = candidate
                return found
    raise AssertionError(preference_id)


async def test_the_tree_is_mirrored_and_follows_renames_deletes_and_additions(
        world: World, org: Vendors) -> None:
    tree = await org.dotdigital.preferences()
    rows = await catalog(org.dataverse, world.account)
    for entry in entries_of_tree(tree):
        row = rows[entry.preference_id]
        assert (row["psync_name"], row["psync_publicname"], row["psync_ispublic"],
                row["psync_iscategory"], row["psync_eccategoryid"] or 0, row["psync_order"],
                row["statecode"]) == (entry.name, entry.public_name, entry.is_public,
                                      entry.is_category, entry.category_id, entry.order, 0)

    renamed, deleted = world.preferences[0], world.preferences[2]
    old = node(tree, renamed.id)
    await org.dotdigital.update_preference(
        renamed.id, public_name="Big news", private_name="big-news-internal",
        is_public=not old["isPublic"], order=int(old["order"]), category_id=old["categoryId"])
    await org.dotdigital.delete_preference(deleted.id)
    category = next(int(n["id"]) for n in tree if not n["isPreference"])
    added = await org.dotdigital.create_preference(public_name="Podcasts", is_public=False,
                                                   category_id=category)
    # The tree read a moment ago is used until it is preference_tree_max_age_s old ...
    await synced(world)
    rows = await catalog(org.dataverse, world.account)
    assert rows[renamed.id]["psync_publicname"] == old["publicName"]
    assert int(added["id"]) not in rows
    # ... then read again, and mirrored.
    await world.age_preference_tree()
    await synced(world)
    rows = await catalog(org.dataverse, world.account)
    assert (rows[renamed.id]["psync_name"], rows[renamed.id]["psync_publicname"],
            rows[renamed.id]["psync_ispublic"]) == ("big-news-internal", "Big news",
                                                    not old["isPublic"])
    # deactivated, never deleted: the rows that point at it keep their history
    assert rows[deleted.id]["statecode"] == 1
    new = rows[int(added["id"])]
    assert (new["psync_name"], new["psync_eccategoryid"], new["psync_ispublic"],
            new["statecode"]) == ("Podcasts", category, False, 0)

    # The mapping is current: a Dynamics change to the new preference reaches dotdigital.
    person = world.people[2]
    await world.edit_dynamics(person.email, int(added["id"]), True)
    await synced(world)
    assert await world.values(person.email, int(added["id"])) == ({True}, True)
    shown = {p["id"]: p for p in (await prefs(world, person.email, "private"))["preferences"]}
    assert shown[int(added["id"])]["status"] == "opted in"
    assert shown[int(added["id"])]["category"]["id"] == category


async def test_each_account_has_its_own_catalog_and_nothing_cascades(tmp_path: Path) -> None:
    async with make_worlds(tmp_path, accounts=2) as (a, b):
        await a.start()  # the services of both accounts
        for world in (a, b):
            await synced(world)
        preference = a.preferences[0]
        async with vendors(a) as in_a, vendors(b) as in_b:
            tree_b = await in_b.dotdigital.preferences()
            old = node(tree_b, preference.id)
            await in_b.dotdigital.update_preference(
                preference.id, public_name="Only in B", is_public=old["isPublic"],
                order=int(old["order"]), category_id=old["categoryId"])
            await in_a.dotdigital.delete_preference(a.preferences[1].id)
            # a change for one email in account A only
            person = a.people[3]
            _, before_b = await b.values(person.email, preference.id)
            await a.set_clock("dotdigital", {"offset_s": 3})
            await a.edit_dotdigital(person.email, preference.id, not before_b)
            for world in (a, b):
                await world.age_preference_tree()
                await synced(world)
            rows_a = await catalog(in_a.dataverse, a.account)
            rows_b = await catalog(in_b.dataverse, b.account)
        assert rows_b[preference.id]["psync_publicname"] == "Only in B"
        assert rows_a[preference.id]["psync_publicname"] != "Only in B"
        assert rows_a[a.preferences[1].id]["statecode"] == 1
        assert rows_b[a.preferences[1].id]["statecode"] == 0
        assert await a.values(person.email, preference.id) == ({not before_b}, not before_b)
        assert (await b.values(person.email, preference.id))[1] == before_b
