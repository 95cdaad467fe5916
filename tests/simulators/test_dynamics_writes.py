"""Dataverse simulator: creates, conditional updates, upserts, deletes, rules, list members."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.simulators.test_dynamics_support import Org, organisation

pytestmark = pytest.mark.anyio

SUBS = "psync_marketingpreferencesubscriptions"


async def _preference(org: Org, dotdigital_id: int = 2001) -> str:
    row = await org.create("psync_marketingpreferences", {
        "psync_name": "Offers", "psync_publicname": "Offers", "psync_ispublic": True,
        "psync_ecaccount": "demo", "psync_ecpreferenceid": dotdigital_id})
    return str(row["psync_marketingpreferenceid"])


async def _subscribed_contact(org: Org, **fields: Any) -> tuple[str, str]:
    """A contact (``fields``) opted in to a new preference: its id, and its subscription's."""
    pref = await _preference(org)
    contact = await org.create("contacts", fields)
    sub = await org.create(SUBS, {
        "psync_preferenceid@odata.bind": f"/psync_marketingpreferences({pref})",
        "psync_contactid@odata.bind": f"/contacts({contact['contactid']})",
        "psync_status": 100000000})
    return str(contact["contactid"]), str(sub["psync_marketingpreferencesubscriptionid"])


async def test_create_answers_204_with_entity_id_or_201_with_the_row() -> None:
    async with organisation() as org:
        plain = await org.call("POST", "contacts", json={"firstname": "Ann", "lastname": "Lee"})
        assert plain.status == 204
        entity = plain.headers["OData-EntityId"]
        assert entity.startswith(f"{org.api}/contacts(")
        got = await org.get(entity)
        assert got.json["fullname"] == "Ann Lee"
        rich = await org.call("POST", "contacts?$select=lastname", json={"lastname": "Ng"},
                              headers={"Prefer": "return=representation"})
        assert rich.status == 201
        assert rich.headers["Preference-Applied"] == "return=representation"
        assert set(rich.json) == {"@odata.context", "@odata.etag", "lastname", "contactid"}


async def test_writes_bump_versions_and_stamp_whole_seconds() -> None:
    async with organisation() as org:
        await org.sim("PUT", "clock", {"freeze_at": "2024-06-01T08:30:15.900Z"})
        row = await org.create("contacts", {"lastname": "Ito", "modifiedon": "2000-01-01T00:00:00Z",
                                            "versionnumber": 5})
        assert row["modifiedon"] == row["createdon"] == "2024-06-01T08:30:15Z"
        assert row["versionnumber"] > 5  # read-only columns are ignored
        assert row["@odata.etag"] == f'W/"{row["versionnumber"]}"'
        await org.sim("PUT", "clock", {"freeze_at": "2024-06-01T09:00:00Z"})
        answer = await org.call("PATCH", f"contacts({row['contactid']})", json={"lastname": "Itō"},
                                headers={"If-Match": "*", "Prefer": "return=representation"})
        assert answer.status == 200
        assert answer.json["versionnumber"] > row["versionnumber"]
        assert answer.json["modifiedon"] == "2024-06-01T09:00:00Z"
        assert answer.json["createdon"] == "2024-06-01T08:30:15Z"
        assert answer.headers["ETag"] == answer.json["@odata.etag"]


async def test_if_match_star_and_etag_conflicts() -> None:
    async with organisation() as org:
        row = await org.create("contacts", {"lastname": "Oduya"})
        path = f"contacts({row['contactid']})"
        missing = await org.call("PATCH", f"contacts({uuid.uuid4()})", json={"lastname": "x"},
                                 headers={"If-Match": "*"})
        assert missing.status == 404
        assert missing.error["code"] == "0x80040217"
        ok = await org.call("PATCH", path, json={"donotbulkemail": True},
                            headers={"If-Match": row["@odata.etag"]})
        assert ok.status == 204
        stale = await org.call("PATCH", path, json={"donotbulkemail": False},
                               headers={"If-Match": row["@odata.etag"]})
        assert stale.status == 412
        assert stale.error == {"code": "0x80060882", "message": "The version of the existing "
                               "record doesn't match the RowVersion property provided."}
        assert (await org.get(path)).json["donotbulkemail"] is True


async def test_upsert_and_create_only() -> None:
    async with organisation() as org:
        new_id = str(uuid.uuid4())
        created = await org.call("PATCH", f"contacts({new_id})", json={"lastname": "Up"})
        assert created.status == 204
        assert created.headers["OData-EntityId"].endswith(f"contacts({new_id})")
        updated = await org.call("PATCH", f"contacts({new_id})", json={"lastname": "Upd"},
                                 headers={"Prefer": "return=representation"})
        assert updated.status == 200
        other = str(uuid.uuid4())
        made = await org.call("PATCH", f"contacts({other})", json={"lastname": "Rep"},
                              headers={"Prefer": "return=representation"})
        assert made.status == 201
        assert "ETag" in made.headers
        again = await org.call("PATCH", f"contacts({new_id})", json={"lastname": "No"},
                               headers={"If-None-Match": "*"})
        assert again.status == 412
        assert again.error == {"code": "0x80040237",
                               "message": "A record with matching key values already exists."}
        fresh = await org.call("PATCH", f"contacts({uuid.uuid4()})", json={"lastname": "Yes"},
                               headers={"If-None-Match": "*"})
        assert fresh.status == 204


async def test_delete_and_unknown_properties() -> None:
    async with organisation() as org:
        row = await org.create("contacts", {"lastname": "Gone"})
        assert (await org.call("DELETE", f"contacts({row['contactid']})")).status == 204
        assert (await org.call("DELETE", f"contacts({row['contactid']})")).status == 404
        bad = await org.call("POST", "contacts", json={"nosuch": 1})
        assert bad.status == 400
        assert bad.error["code"] == "0x80060888"
        wrong_type = await org.call("POST", "contacts", json={"donotemail": "yes"})
        assert wrong_type.status == 400
        too_long = await org.call("POST", "contacts", json={"lastname": "x" * 51})
        assert too_long.error["code"] == "0x80044331"


async def test_inactive_contacts_and_closed_leads_refuse_updates() -> None:
    async with organisation() as org:
        contact = await org.create("contacts", {"lastname": "Quiet"})
        path = f"contacts({contact['contactid']})"
        assert (await org.call("PATCH", path, json={"statecode": 1},
                               headers={"If-Match": "*"})).status == 204
        assert (await org.get(path)).json["statuscode"] == 2
        refused = await org.call("PATCH", path, json={"donotbulkemail": True},
                                 headers={"If-Match": "*"})
        assert refused.status == 400
        assert refused.error["code"] == "0x80040203"
        assert (await org.call("PATCH", path, json={"statecode": 0},
                               headers={"If-Match": "*"})).status == 204
        lead = await org.create("leads", {"lastname": "Won", "statecode": 1})
        assert lead["statuscode"] == 3
        closed = await org.call("PATCH", f"leads({lead['leadid']})", json={"donotemail": True},
                                headers={"If-Match": "*"})
        assert closed.status == 400


async def test_subscription_rules() -> None:
    async with organisation() as org:
        pref = await _preference(org)
        contact = await org.create("contacts", {"lastname": "Sub"})
        lead = await org.create("leads", {"lastname": "Lead"})
        base = {"psync_preferenceid@odata.bind": f"/psync_marketingpreferences({pref})",
                "psync_status": 100000000}
        neither = await org.call("POST", SUBS, json=base)
        assert neither.status == 400
        assert neither.error["code"] == "0x80040265"
        both = await org.call("POST", SUBS, json={
            **base, "psync_contactid@odata.bind": f"/contacts({contact['contactid']})",
            "psync_leadid@odata.bind": f"leads({lead['leadid']})"})
        assert both.error["code"] == "0x80040265"
        ghost = await org.call("POST", SUBS, json={
            **base, "psync_contactid@odata.bind": f"/contacts({uuid.uuid4()})"})
        assert ghost.status == 404
        bad_status = await org.call("POST", SUBS, json={
            **base, "psync_status": 3, "psync_contactid@odata.bind":
                f"/contacts({contact['contactid']})"})
        assert bad_status.error["code"] == "0x80044331"
        good = await org.create(SUBS, {
            **base, "psync_contactid@odata.bind": f"{org.api}/contacts({contact['contactid']})"})
        assert good["_psync_contactid_value"] == contact["contactid"]
        assert good["_psync_preferenceid_value"] == pref
        duplicate = await org.call("POST", SUBS, json={
            **base, "psync_contactid@odata.bind": f"contacts({contact['contactid']})"})
        assert duplicate.status == 412
        assert duplicate.error["code"] == "0x80040237"
        direct = await org.call("POST", SUBS, json={"_psync_contactid_value": contact["contactid"]})
        assert direct.status == 400


async def test_preferences_of_an_inactive_contact_cannot_be_edited() -> None:
    async with organisation() as org:
        contact, sub = await _subscribed_contact(org, lastname="Paused")
        await org.call("PATCH", f"contacts({contact})", json={"statecode": 1},
                       headers={"If-Match": "*"})
        refused = await org.call("PATCH", f"{SUBS}({sub})", json={"psync_status": 100000001},
                                 headers={"If-Match": "*"})
        assert refused.status == 400
        assert refused.error["code"] == "0x80040265"
        assert "read-only" in refused.error["message"]


async def test_list_membership_by_actions_and_refs() -> None:
    async with organisation() as org:
        lst = await org.create("lists", {"listname": "News", "createdfromcode": 2,
                                         "psync_emailactivated": True})
        list_id = lst["listid"]
        ann = await org.create("contacts", {"lastname": "Ann", "emailaddress1": "a@example.com"})
        bob = await org.create("contacts", {"lastname": "Bob"})
        lead = await org.create("leads", {"lastname": "Lee"})
        added = await org.call("POST", f"lists({list_id})/Microsoft.Dynamics.CRM.AddMemberList",
                               json={"EntityId": ann["contactid"]})
        assert added.status == 200
        ref = await org.call("POST", f"lists({list_id})/listcontact_association/$ref",
                             json={"@odata.id": f"{org.api}/contacts({bob['contactid']})"})
        assert ref.status == 204
        wrong = await org.call("POST", f"lists({list_id})/Microsoft.Dynamics.CRM.AddMemberList",
                               json={"EntityId": lead["leadid"]})
        assert wrong.status == 404  # not a contact
        wrong_ref = await org.call("POST", f"lists({list_id})/listlead_association/$ref",
                                   json={"@odata.id": f"{org.api}/leads({lead['leadid']})"})
        assert wrong_ref.status == 400
        members = await org.get(f"lists({list_id})/listcontact_association?$select=emailaddress1")
        assert {m["contactid"] for m in members.json["value"]} == {ann["contactid"],
                                                                   bob["contactid"]}
        mine = await org.get(f"contacts({ann['contactid']})/listcontact_association"
                             "?$select=listname")
        assert [v["listname"] for v in mine.json["value"]] == ["News"]
        removed = await org.call(
            "DELETE", f"lists({list_id})/listcontact_association({bob['contactid']})/$ref")
        assert removed.status == 204
        await org.call("POST", f"lists({list_id})/Microsoft.Dynamics.CRM.RemoveMemberList",
                       json={"EntityId": ann["contactid"]})
        empty = await org.get(f"lists({list_id})/listcontact_association")
        assert empty.json["value"] == []


async def test_update_multiple_is_all_or_nothing() -> None:
    async with organisation() as org:
        a = await org.create("contacts", {"lastname": "A"})
        b = await org.create("contacts", {"lastname": "B"})
        ok = await org.call("POST", "contacts/Microsoft.Dynamics.CRM.UpdateMultiple", json={
            "Targets": [{"@odata.type": "Microsoft.Dynamics.CRM.contact",
                         "contactid": r["contactid"], "donotbulkemail": True} for r in (a, b)]})
        assert ok.status == 204
        failed = await org.call("POST", "contacts/Microsoft.Dynamics.CRM.UpdateMultiple", json={
            "Targets": [{"contactid": a["contactid"], "donotemail": True},
                        {"contactid": str(uuid.uuid4()), "donotemail": True}]})
        assert failed.status == 404
        assert (await org.get(f"contacts({a['contactid']})")).json["donotemail"] is False


async def test_single_valued_navigation_and_lookup_refs() -> None:
    async with organisation() as org:
        _, sub = await _subscribed_contact(org, lastname="Ann", emailaddress1="a@example.com")
        bob = await org.create("contacts", {"lastname": "Bob"})
        path = f"{SUBS}({sub})"
        nav = await org.get(f"{path}/psync_contactid?$select=emailaddress1")
        assert nav.json["emailaddress1"] == "a@example.com"
        moved = await org.call("PUT", f"{path}/psync_contactid/$ref",
                               json={"@odata.id": f"{org.api}/contacts({bob['contactid']})"})
        assert moved.status == 204
        assert (await org.get(path)).json["_psync_contactid_value"] == bob["contactid"]
        cleared = await org.call("DELETE", f"{path}/psync_contactid/$ref")
        assert cleared.status == 400  # a subscription must keep exactly one record
        assert cleared.error["code"] == "0x80040265"
        put = await org.call("PUT", f"{path}/psync_status", json={"value": 100000001})
        assert put.status == 204
        assert (await org.get(f"{path}/psync_status")).json["value"] == 100000001
        not_allowed = await org.call("DELETE", "contacts")
        assert not_allowed.status == 405


async def test_deleting_a_contact_cascades_to_its_subscriptions() -> None:
    async with organisation() as org:
        ann, sub = await _subscribed_contact(org, lastname="Ann")
        tracked = (await org.get(SUBS, headers={"Prefer": "odata.track-changes"})).json
        assert (await org.call("DELETE", f"contacts({ann})")).status == 204
        delta = (await org.get(tracked["@odata.deltaLink"])).json["value"]
        assert delta == [{"@odata.context": f"{org.api}/$metadata#{SUBS}/$deletedEntity",
                          "id": sub,
                          "reason": "deleted"}]


async def test_a_write_returns_only_the_selected_columns_and_the_key() -> None:
    async with organisation() as org:
        new_id = str(uuid.uuid4())
        asked = "contacts({id})?$select=versionnumber,modifiedon"
        prefer = {"Prefer": "return=representation"}
        made = await org.call("PATCH", asked.format(id=new_id), json={"lastname": "Up"},
                              headers=prefer)
        changed = await org.call("PATCH", asked.format(id=new_id), json={"lastname": "Upd"},
                                 headers={**prefer, "If-Match": made.headers["ETag"]})
        assert (made.status, changed.status) == (201, 200)
        for answer in (made, changed):
            assert set(answer.json) == {"@odata.context", "@odata.etag", "contactid",
                                        "versionnumber", "modifiedon"}
            assert answer.json["@odata.context"].endswith(
                "$metadata#contacts(versionnumber,modifiedon)/$entity")
            assert answer.headers["ETag"] == answer.json["@odata.etag"]
        assert changed.json["versionnumber"] > made.json["versionnumber"]
        # an unknown column is refused before anything is written
        refused = await org.call("PATCH", f"contacts({new_id})?$select=nosuchcolumn",
                                 json={"lastname": "Never"}, headers=prefer)
        assert refused.status == 400
        assert (await org.get(f"contacts({new_id})")).json["lastname"] == "Upd"
