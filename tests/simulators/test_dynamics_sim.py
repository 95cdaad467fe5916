"""Dataverse simulator: /_sim/ seeding, editing, state files, reset."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.simulators import seeding
from tests.simulators.test_dynamics_support import organisation

pytestmark = pytest.mark.anyio


async def test_seed_is_deterministic_and_matches_the_shared_sample_data() -> None:
    async with organisation() as one, organisation() as two:
        a = await one.seed(records=30, preferences=4, seed=11)
        b = await two.seed(records=30, preferences=4, seed=11)
        assert a == b
        people = seeding.people(30, 11)
        assert a["sample_emails"] == [p.email for p in people[:5]]
        assert a["contacts"] == sum(p.kind == "contact" for p in people)
        assert a["leads"] == 30 - a["contacts"]
        assert a["preferences"] == len(seeding.preference_tree(4, 11))
        expected_subs = sum(
            seeding.initial_state(11, "dynamics", p.email, n.id) is not None
            for p in people for n in seeding.leaf_preferences(4, 11))
        assert a["subscriptions"] == expected_subs
        rows_a = (await one.get("contacts?$select=emailaddress1")).json["value"]
        rows_b = (await two.get("contacts?$select=emailaddress1")).json["value"]
        assert [r["contactid"] for r in rows_a] == [r["contactid"] for r in rows_b]


async def test_seeded_catalogue_lists_and_subscriptions() -> None:
    async with organisation() as org:
        made = await org.seed(records=10, preferences=4, seed=3)
        prefs = (await org.get("psync_marketingpreferences?$select=psync_ecpreferenceid,"
                               "psync_eccategoryid,psync_iscategory,psync_ecaccount")).json["value"]
        category = [p for p in prefs if p["psync_iscategory"]]
        assert len(category) == 1
        children = [p for p in prefs if p["psync_eccategoryid"] == category[0]["psync_ecpreferenceid"]]
        assert len(children) == 2
        assert {p["psync_ecaccount"] for p in prefs} == {"demo"}
        members = (await org.get(f"lists({made['lists']['contact']})/listcontact_association"
                                 "?$count=true")).json
        assert members["@odata.count"] == made["contacts"]
        email = made["sample_emails"][0]
        person = next(p for p in seeding.people(10, 3) if p.email == email)
        kind = person.kind
        rows = (await org.get(f"{kind}s?$filter=emailaddress1 eq '{email}'")).json["value"]
        record_id = rows[0][f"{kind}id"]
        subs = (await org.get("psync_marketingpreferencesubscriptions?$select=psync_status"
                              f"&$filter=_psync_{kind}id_value eq {record_id}"
                              "&$expand=psync_preferenceid($select=psync_ecpreferenceid)")).json
        got = {s["psync_preferenceid"]["psync_ecpreferenceid"]: s["psync_status"]
               for s in subs["value"]}
        expected = {}
        for node in seeding.leaf_preferences(4, 3):
            state = seeding.initial_state(3, "dynamics", email, node.id)
            if state is not None:
                expected[node.id] = 100000000 if state else 100000001
        assert got == expected


async def test_edit_as_a_user_would() -> None:
    async with organisation() as org:
        made = await org.seed(records=5, preferences=2, seed=5)
        email = made["sample_emails"][0]
        pref_id = seeding.leaf_preferences(2, 5)[0].id
        edited = await org.sim("POST", "dynamics/edit", {"email": email, "preference_id": pref_id,
                                                         "status": "opted_out"})
        assert edited.status == 200, edited.text
        sub = (await org.get(f"psync_marketingpreferencesubscriptions({edited.json['id']})")).json
        assert sub["psync_status"] == 100000001
        deactivated = await org.sim("POST", "dynamics/edit", {"email": email,
                                                              "set": {"statecode": 1}})
        assert deactivated.status == 200
        refused = await org.sim("POST", "dynamics/edit", {"email": email, "preference_id": pref_id,
                                                          "status": "opted_in"})
        assert refused.status == 400
        assert refused.json["error"]["code"] == "0x80040265"


async def test_edits_apply_in_order_each_answered_in_its_place() -> None:
    async with organisation() as org:
        made = await org.seed(records=5, preferences=2, seed=5)
        first, second = made["sample_emails"][:2]
        pref_id = seeding.leaf_preferences(2, 5)[0].id
        edited = await org.sim("POST", "dynamics/edits", {"edits": [
            {"email": first, "preference_id": pref_id, "status": "opted_in"},
            {"email": "nobody@example.com", "preference_id": pref_id, "status": "opted_in"},
            {"email": first, "preference_id": pref_id, "status": "opted_out"},
            {"email": second, "set": {"statecode": 1}},
            {"email": second, "preference_id": pref_id, "status": "opted_in"}]})
        assert edited.status == 200, edited.text
        results = edited.json["results"]
        assert [r.get("status") for r in results] == [None, 400, None, None, 400]
        assert results[4]["error"]["code"] == "0x80040265"  # an inactive record's, as /edit
        assert results[0]["id"] == results[2]["id"]
        assert results[2]["versionnumber"] > results[0]["versionnumber"]
        sub = (await org.get(f"psync_marketingpreferencesubscriptions({results[2]['id']})")).json
        assert sub["psync_status"] == 100000001  # the later edit won
        assert (await org.sim("POST", "dynamics/edits", {"edits": "no"})).status == 400


async def test_state_file_round_trip(tmp_path: Path) -> None:
    state = tmp_path / "dynamics.json"
    async with organisation(state_file=state) as org:
        made = await org.seed(records=8, preferences=2)
        assert (await org.sim("POST", "save")).status == 200
        before = (await org.get("contacts?$select=emailaddress1,modifiedon")).json["value"]
    async with organisation(state_file=state) as again:
        after = (await again.get("contacts?$select=emailaddress1,modifiedon")).json["value"]
        assert after == before
        tables = (await again.sim("GET", "dynamics/tables")).json
        assert tables["tables"]["psync_marketingpreferencesubscriptions"]["rows"] == made[
            "subscriptions"]
        row = await again.create("contacts", {"lastname": "After"})
        assert row["versionnumber"] > max(int(r["@odata.etag"][3:-1]) for r in before)


async def test_reset_clears_data_and_demo_client_is_generated() -> None:
    async with organisation() as org:
        await org.seed(records=4)
        assert (await org.sim("POST", "reset")).status == 200
        assert (await org.get("contacts")).json["value"] == []
    async with organisation(login=False, clients=()) as demo:
        assert demo.simulator.demo_client is not None
        tenant, client_id, secret = demo.simulator.demo_client
        token = await demo.raw("POST", f"{demo.url}/{tenant}/oauth2/v2.0/token", data={
            "grant_type": "client_credentials", "client_id": client_id,
            "client_secret": secret, "scope": f"{demo.url}/.default"})
        assert token.status == 200
