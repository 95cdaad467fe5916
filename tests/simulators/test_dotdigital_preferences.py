"""The preference tree, a contact's preferences (GET/PUT), subscriptions and suppression."""

from __future__ import annotations

from typing import Any

import pytest

from tests.simulators.test_dotdigital_support import Sim, running

pytestmark = pytest.mark.anyio


def _by_id(tree: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    out = {}
    for node in tree:
        out[node["id"]] = node
        for kid in node.get("preferences") or []:
            out[kid["id"]] = kid
    return out


async def _new_contact(sim: Sim, email: str) -> dict[str, Any]:
    return dict(await sim.ok("POST", "/v2/contacts", expect=201,
                             json={"Email": email, "OptInType": "Single"}))


async def test_preference_tree_create_update_delete() -> None:
    async with running() as sim:
        await sim.freeze("2025-01-01T00:00:00.000Z")
        category = await sim.ok("POST", "/v2/preferences", json={
            "publicName": "Topics", "privateName": "topics", "isPreference": False})
        assert category["isPreference"] is False and category["categoryId"] == 0
        first = await sim.ok("POST", "/v2/preferences", json={
            "PublicName": "News", "PrivateName": "news", "IsPreference": True,
            "CategoryId": category["id"], "isPublic": True})
        second = await sim.ok("POST", "/v2/preferences", json={
            "publicName": "Offers", "privateName": "offers", "isPreference": True,
            "categoryID": category["id"], "order": "top", "isPublic": False})
        loose = await sim.ok("POST", "/v2/preferences", json={
            "publicName": "Football", "privateName": "football", "isPreference": True})
        tree = await sim.ok("GET", "/v2/preferences")
        assert [n["id"] for n in tree] == [category["id"], loose["id"]]
        top = tree[0]
        assert top["preferenceCount"] == 2
        assert [k["id"] for k in top["preferences"]] == [second["id"], first["id"]]
        assert [k["order"] for k in top["preferences"]] == ["0", "1"]
        assert top["preferences"][0]["isPublic"] is False
        assert top["created"] == "2025-01-01T00:00:00.000Z"
        assert "preferences" not in tree[1] and "isOptedIn" not in tree[1]

        await sim.freeze("2025-02-01T00:00:00.000Z")
        renamed = await sim.ok("PUT", f"/v2/preferences/{first['id']}", json={
            "id": first["id"], "publicName": "Newsletter", "privateName": "news"})
        assert renamed["publicName"] == "Newsletter"
        assert renamed["lastModified"] == "2025-02-01T00:00:00.000Z"
        assert renamed["created"] == "2025-01-01T00:00:00.000Z"
        changed = await sim.ok("GET", "/v2/preferences/modified-since/2025-01-15")
        assert [n["id"] for n in changed] == [category["id"]]
        assert [k["id"] for k in changed[0]["preferences"]] == [first["id"]]

        bad_parent = await sim.call("POST", "/v2/preferences", json={
            "publicName": "X", "privateName": "x", "isPreference": True, "categoryId": loose["id"]})
        assert bad_parent.status == 400 and "ERROR_PREFERENCE_INVALID" in bad_parent.body["message"]
        nameless = await sim.call("POST", "/v2/preferences", json={"privateName": "x"})
        assert nameless.status == 400 and "ERROR_PARAMETER_INVALID" in nameless.body["message"]
        flip = await sim.call("PUT", f"/v2/preferences/{first['id']}", json={
            "publicName": "N", "privateName": "n", "isPreference": False})
        assert flip.status == 400

        deleted = await sim.call("DELETE", f"/v2/preferences/{category['id']}")
        assert deleted.status == 200
        assert deleted.headers["Content-Type"].startswith("text/plain")
        assert "deleted successfully" in deleted.text
        assert [n["id"] for n in await sim.ok("GET", "/v2/preferences")] == [loose["id"]]
        gone = await sim.call("GET", f"/v2/preferences/{first['id']}")
        assert gone.status == 404 and "ERROR_PREFERENCE_NOT_FOUND" in gone.body["message"]
        again = await sim.call("DELETE", f"/v2/preferences/{category['id']}")
        assert again.status == 404


async def test_contact_preferences_partial_update_and_three_states() -> None:
    async with running() as sim:
        seeded = await sim.seed(records=3, preferences=4)
        category = seeded["categories"][0]
        inside, standalone = seeded["preferences"][:2], seeded["preferences"][2:]
        email = "Mixed.Case+tag@Example.com"
        await _new_contact(sim, email)
        tree = await sim.ok("GET", "/v2/contacts/mixed.case%2Btag%40example.com/preferences")
        assert all(n["isOptedIn"] is None for n in _by_id(tree).values() if n["isPreference"])
        await sim.freeze("2025-05-05T10:00:00.123Z")
        body = [{"id": category, "isPreference": False, "preferences": [
                    {"id": inside[0], "isPreference": True, "isOptedIn": True}]},
                {"ID": standalone[0], "ISPREFERENCE": True, "ISOPTEDIN": False}]
        put = await sim.call("PUT", "/v2/contacts/mixed.case+tag@example.com/preferences", json=body,
                             raw_path=True)
        assert put.status == 200
        nodes = _by_id(await sim.ok("GET", "/v2/contact/MIXED.CASE%2BTAG%40EXAMPLE.COM/preferences"))
        assert nodes[inside[0]]["isOptedIn"] is True
        assert nodes[inside[1]]["isOptedIn"] is None  # not listed: unchanged
        assert nodes[standalone[0]]["isOptedIn"] is False
        assert nodes[standalone[1]]["isOptedIn"] is None
        assert "isOptedIn" not in nodes[category]
        # A second PUT touches only what it lists.
        await sim.freeze("2025-05-06T00:00:00.000Z")
        await sim.ok("PUT", "/v2/contacts/mixed.case%2Btag%40example.com/preferences",
                     json=[{"id": standalone[1], "isPreference": True, "isOptedIn": True}])
        subs = await sim.ok("GET", "/v2/contacts/mixed.case%2Btag%40example.com/subscriptions")
        stamps = {o["marketingPreferenceId"]: o for o in subs["marketingPreferenceOptIns"]}
        assert set(stamps) == {inside[0], standalone[0], standalone[1]}
        assert stamps[inside[0]]["dateModifed"] == "2025-05-05T10:00:00.123Z"
        assert stamps[standalone[0]] | {"dateModifed": None} == {
            "marketingPreferenceId": standalone[0], "addressBookId": 0, "isOptedIn": False,
            "dateModifed": None}
        assert stamps[standalone[1]]["dateModifed"] == "2025-05-06T00:00:00.000Z"
        assert subs["contact"]["email"] == email and subs["contact"]["status"] == "Subscribed"


async def test_writing_the_same_value_again_stamps_date_modified() -> None:
    async with running() as sim:
        seeded = await sim.seed(records=1, preferences=1)
        email, pref = seeded["emails"][0], seeded["preferences"][0]
        body = [{"id": pref, "isPreference": True, "isOptedIn": True}]
        await sim.freeze("2025-06-01T00:00:00.000Z")
        await sim.ok("PUT", f"/v2/contacts/{email}/preferences", json=body)
        await sim.freeze("2025-06-02T00:00:00.000Z")
        await sim.ok("PUT", f"/v2/contacts/{email}/preferences", json=body)
        subs = await sim.ok("GET", f"/v2/contacts/{email}/subscriptions")
        assert subs["marketingPreferenceOptIns"][0]["dateModifed"] == "2025-06-02T00:00:00.000Z"
        v3 = await sim.ok("GET", f"/contacts/v3/email/{email}")
        assert v3["updated"] == "2025-06-02T00:00:00.000Z"


async def test_bad_preference_writes_change_nothing() -> None:
    async with running() as sim:
        seeded = await sim.seed(records=1, preferences=4)
        email, category = seeded["emails"][0], seeded["categories"][0]
        good, loose = seeded["preferences"][0], seeded["preferences"][3]
        before = await sim.ok("GET", f"/v2/contacts/{email}/subscriptions")
        cases: list[tuple[Any, int, str]] = [
            ([{"id": good, "isPreference": True, "isOptedIn": True},
              {"id": 999999, "isPreference": True, "isOptedIn": True}], 404,
             "ERROR_PREFERENCE_NOT_FOUND"),
            ([{"id": category, "isPreference": True, "isOptedIn": True}], 400,
             "ERROR_PREFERENCE_INVALID"),
            ([{"id": category, "isPreference": False, "isOptedIn": True}], 400,
             "ERROR_PREFERENCE_INVALID"),
            ([{"id": category, "isPreference": False, "preferences": [
                {"id": loose, "isPreference": True, "isOptedIn": True}]}], 400,
             "ERROR_PREFERENCE_INVALID"),
            ([{"id": good, "isPreference": True}], 400, "ERROR_PARAMETER_INVALID"),
            ({"id": good}, 400, "ERROR_PARAMETER_INVALID"),
        ]
        for body, status, token in cases:
            answer = await sim.call("PUT", f"/v2/contacts/{email}/preferences", json=body)
            assert (answer.status, token in answer.body["message"]) == (status, True), body
        unknown = await sim.call("PUT", "/v2/contacts/nobody@example.com/preferences",
                                 json=[{"id": good, "isPreference": True, "isOptedIn": True}])
        assert unknown.status == 404
        assert unknown.body == {"message": "Error: ERROR_CONTACT_NOT_FOUND"}
        assert await sim.ok("GET", f"/v2/contacts/{email}/subscriptions") == before


async def test_suppressed_contact_refuses_preference_changes() -> None:
    async with running() as sim:
        seeded = await sim.seed(records=2, preferences=1)
        email, pref = seeded["emails"][0], seeded["preferences"][0]
        body = [{"id": pref, "isPreference": True, "isOptedIn": True}]
        before = await sim.ok("GET", f"/v2/contacts/{email}/subscriptions")
        for status in ("Unsubscribed", "HardBounced", "IspComplained", "Suppressed"):
            await sim.edit(email, status=status)
            refused = await sim.call("PUT", f"/v2/contacts/{email}/preferences", json=body)
            assert refused.status == 400
            assert refused.body == {"message": "Contact is suppressed. ERROR_CONTACT_SUPPRESSED"}
            patched = await sim.call("PATCH", f"/contacts/v3/email/{email}",
                                     json={"preferences": [{"id": pref, "isOptedIn": True}]})
            assert patched.status == 400
            assert patched.body["errorCode"] == "contacts:contactSuppressed"
        assert await sim.ok("GET", f"/v2/contacts/{email}/subscriptions") == before | {
            "contact": before["contact"] | {"status": "Suppressed"}}
        # Soft bounces do not suppress.
        other = seeded["emails"][1]
        await sim.edit(other, status="SoftBounced")
        await sim.ok("PUT", f"/v2/contacts/{other}/preferences", json=body)
