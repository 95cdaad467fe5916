"""Dataverse simulator: change tracking (initial sync, deltas, deletes, expiry, refusals)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.simulators.test_dynamics_support import Org, organisation

pytestmark = pytest.mark.anyio

TRACK = {"Prefer": "odata.track-changes"}


async def _full_sync(org: Org, entity_set: str, page: int) -> tuple[list[dict[str, Any]], str]:
    url = f"{org.api}/{entity_set}?$select=emailaddress1,donotbulkemail"
    rows: list[dict[str, Any]] = []
    while True:
        answer = await org.get(url, headers={"Prefer": f"odata.track-changes,odata.maxpagesize={page}"})
        assert answer.status == 200, answer.text
        assert "odata.track-changes" in answer.headers["Preference-Applied"]
        body = answer.json
        rows += body["value"]
        if "@odata.nextLink" in body:
            assert "@odata.deltaLink" not in body
            url = body["@odata.nextLink"]
            continue
        return rows, body["@odata.deltaLink"]


async def test_initial_sync_pages_and_ends_with_a_delta_link() -> None:
    async with organisation() as org:
        await org.seed(records=30)
        rows, delta = await _full_sync(org, "contacts", page=8)
        total = (await org.sim("GET", "dynamics/tables")).json["tables"]["contacts"]["rows"]
        assert len(rows) == total == len({r["contactid"] for r in rows})
        token = parse_qs(urlsplit(delta).query)["$deltatoken"][0]
        version, _, stamp = token.partition("!")
        assert version.isdigit() and len(stamp) == len("05/01/2024 10:00:00")
        assert "$select=emailaddress1,donotbulkemail" in delta
        assert "%21" in delta  # the token is URL-encoded in the link


async def test_delta_lists_changes_once_then_deletions() -> None:
    async with organisation() as org:
        await org.seed(records=10)
        rows, delta = await _full_sync(org, "contacts", page=100)
        first, second, third = (r["contactid"] for r in rows[:3])
        for flag in (True, False, True):  # changed three times: reported once, latest state
            await org.call("PATCH", f"contacts({first})", json={"donotbulkemail": flag},
                           headers={"If-Match": "*"})
        await org.call("DELETE", f"contacts({second})")
        made = await org.create("contacts", {"lastname": "New", "emailaddress1": "n@example.com"})
        gone = await org.create("contacts", {"lastname": "Brief"})
        await org.call("DELETE", f"contacts({gone['contactid']})")
        answer = await org.get(delta)
        assert answer.status == 200
        body = answer.json
        assert body["@odata.context"].endswith("$metadata#contacts(emailaddress1,donotbulkemail)"
                                               "/$delta")
        changed = [v for v in body["value"] if "reason" not in v]
        deleted = [v for v in body["value"] if v.get("reason") == "deleted"]
        assert body["value"] == changed + deleted  # changes first, then deletions
        assert [c["contactid"] for c in changed] == [first, made["contactid"]]
        assert changed[0]["donotbulkemail"] is True
        assert [d["id"] for d in deleted] == [second, gone["contactid"]]
        assert deleted[0]["@odata.context"].endswith("$metadata#contacts/$deletedEntity")
        assert third not in str(body["value"])
        again = (await org.get(body["@odata.deltaLink"])).json
        assert again["value"] == []
        assert "@odata.deltaLink" in again


async def test_delta_token_accepted_with_any_select_and_paged() -> None:
    async with organisation() as org:
        await org.seed(records=12)
        rows, delta = await _full_sync(org, "contacts", page=100)
        for row in rows[:5]:
            await org.call("PATCH", f"contacts({row['contactid']})", json={"donotemail": True},
                           headers={"If-Match": "*"})
        token = parse_qs(urlsplit(delta).query)["$deltatoken"][0]
        bare = await org.get("contacts", params={"$deltatoken": token})  # no $select at all
        assert bare.status == 200
        assert sorted(v["contactid"] for v in bare.json["value"]) == sorted(
            r["contactid"] for r in rows[:5])
        assert "emailaddress1" in bare.json["value"][0]  # every column without $select
        seen: list[str] = []
        url: str | None = delta
        while url:
            body = (await org.get(url, headers={"Prefer": "odata.maxpagesize=2"})).json
            seen += [v["contactid"] for v in body["value"]]
            url = body.get("@odata.nextLink")
            assert (url is None) == ("@odata.deltaLink" in body)
        assert sorted(seen) == sorted(r["contactid"] for r in rows[:5])


@pytest.mark.parametrize("option", ["$filter=statecode eq 0", "$orderby=fullname",
                                    "$expand=parentcustomerid", "$top=5"])
async def test_options_refused_with_change_tracking(option: str) -> None:
    async with organisation() as org:
        answer = await org.get(f"contacts?$select=fullname&{option}", headers=TRACK)
        assert answer.status == 400
        name = option.split("=")[0][1:]
        assert answer.error["message"] == (f'The "{name}" query parameter isn\'t supported when '
                                           "Change Tracking is enabled.")


async def test_expired_delta_token_asks_for_a_full_sync() -> None:
    async with organisation() as org:
        await org.seed(records=3)
        _, delta = await _full_sync(org, "contacts", page=100)
        await org.sim("PUT", "clock", {"offset_s": 8 * 24 * 3600})
        await org.login()  # the access token expired too
        answer = await org.get(delta)
        assert answer.status == 400
        assert answer.error == {"code": "0x80044352", "message": "Version stamp associated with "
                                "the client has expired. Please perform a full sync."}


async def test_subscription_changes_are_tracked() -> None:
    async with organisation() as org:
        seeded = await org.seed(records=5, preferences=2)
        assert seeded["subscriptions"] > 0
        answer = await org.get("psync_marketingpreferencesubscriptions?$select=psync_status",
                               headers=TRACK)
        body = answer.json
        sub = body["value"][0]["psync_marketingpreferencesubscriptionid"]
        await org.call("PATCH", f"psync_marketingpreferencesubscriptions({sub})",
                       json={"psync_status": 100000001}, headers={"If-Match": "*"})
        delta = (await org.get(body["@odata.deltaLink"])).json
        assert [(v["psync_marketingpreferencesubscriptionid"], v["psync_status"])
                for v in delta["value"]] == [(sub, 100000001)]
