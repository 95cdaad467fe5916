"""Dataverse simulator: $select, $filter, $orderby, $top, $count, $expand, paging, by-key reads."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

from tests.simulators.test_dynamics_support import Org, organisation

pytestmark = pytest.mark.anyio


async def _contacts(org: Org, query: str) -> list[dict[str, Any]]:
    answer = await org.get(f"contacts?{query}")
    assert answer.status == 200, answer.text
    return list(answer.json["value"])


async def _people(org: Org) -> dict[str, str]:
    """Creates a few contacts; returns their ids by first name."""
    out = {}
    for first, last, email, bulk in (("Ann", "O'Hara", "ann@example.com", False),
                                     ("Bob", "Byrne", "BOB@Example.com", True),
                                     ("Cy", "Chen", None, False)):
        row = await org.create("contacts", {"firstname": first, "lastname": last,
                                            "emailaddress1": email, "donotbulkemail": bulk})
        out[first] = row["contactid"]
    return out


async def test_pages_follow_next_links_with_a_paging_cookie() -> None:
    async with organisation() as org:
        await org.seed(records=25)
        seen: list[str] = []
        url = f"{org.api}/contacts?$select=fullname"
        pages = 0
        while url:
            answer = await org.get(url, headers={"Prefer": "odata.maxpagesize=7"})
            assert answer.status == 200
            assert answer.headers["Preference-Applied"] == "odata.maxpagesize=7"
            body = answer.json
            assert len(body["value"]) <= 7
            seen += [row["contactid"] for row in body["value"]]
            pages += 1
            url = body.get("@odata.nextLink", "")
            if url:
                token = parse_qs(urlsplit(url).query)["$skiptoken"][0]
                assert token.startswith(f'<cookie pagenumber="{pages + 1}" pagingcookie="')
                assert 'istracking="False"' in token
                assert "$select=fullname" in url
        total = (await org.sim("GET", "dynamics/tables")).json["tables"]["contacts"]["rows"]
        assert len(seen) == total == len(set(seen))
        assert seen == sorted(seen)  # primary key order by default
        assert pages == -(-total // 7)


async def test_a_paging_cookie_without_the_last_rows_key_is_refused() -> None:
    async with organisation() as org:
        await org.seed(records=10)
        query = "contacts?$select=fullname&$orderby=modifiedon"
        first = await org.get(query, headers={"Prefer": "odata.maxpagesize=3"})
        token = parse_qs(urlsplit(first.json["@odata.nextLink"]).query)["$skiptoken"][0]
        # the key's element kept, its value gone (as a hand-made cookie might have it)
        outer = ET.fromstring(token)
        inner = ET.fromstring(unquote(outer.attrib["pagingcookie"]))
        key = inner.find("contactid")
        assert key is not None and "last" in key.attrib
        del key.attrib["last"]
        outer.set("pagingcookie", quote(ET.tostring(inner, encoding="unicode")))
        forged = ET.tostring(outer, encoding="unicode")
        answer = await org.get(f"{query}&$skiptoken={quote(forged)}",
                               headers={"Prefer": "odata.maxpagesize=3"})
        assert answer.status == 400, answer.text
        assert "$skiptoken is not valid" in answer.text


async def test_prefer_values_in_one_header_or_in_several() -> None:
    async with organisation() as org:
        await org.seed(records=10)
        one = await org.get("contacts", headers={
            "Prefer": 'odata.include-annotations="*",odata.maxpagesize=2'})
        assert len(one.json["value"]) == 2
        async with org.session.get(f"{org.api}/contacts", headers=[
                ("Authorization", f"Bearer {org.token}"), ("Prefer", "odata.maxpagesize=3"),
                ("Prefer", 'odata.include-annotations="*"')]) as resp:
            body = await resp.json()
            assert len(body["value"]) == 3
            assert resp.headers["Preference-Applied"] == (
                'odata.maxpagesize=3,odata.include-annotations="*"')


async def test_filters_on_strings_numbers_bools_guids_nulls_and_functions() -> None:
    async with organisation() as org:
        ids = await _people(org)

        async def names(flt: str) -> set[str]:
            return {r["firstname"] for r in await _contacts(org, f"$filter={flt}")}

        assert await names("emailaddress1 eq 'bob@example.com'") == {"Bob"}  # case-insensitive
        assert await names("lastname eq 'O''Hara'") == {"Ann"}
        assert await names("donotbulkemail eq true") == {"Bob"}
        assert await names("emailaddress1 eq null") == {"Cy"}
        assert await names("emailaddress1 ne null and not (donotbulkemail eq true)") == {"Ann"}
        assert await names(f"contactid eq {ids['Cy']}") == {"Cy"}
        assert await names("statecode eq 0 and (firstname eq 'Ann' or firstname eq 'Cy')") == {
            "Ann", "Cy"}
        assert await names("contains(lastname,'YR')") == {"Bob"}
        assert await names("startswith(firstname,'c') or endswith(emailaddress1,'.com')") == {
            "Ann", "Bob", "Cy"}
        assert await names("versionnumber gt 0") == {"Ann", "Bob", "Cy"}


async def test_filters_on_lookups_and_datetimes() -> None:
    async with organisation() as org:
        await org.sim("PUT", "clock", {"freeze_at": "2024-05-01T10:00:00.700Z"})
        seeded = await org.seed(records=6, preferences=2)
        await org.sim("PUT", "clock", {"freeze_at": "2024-05-02T10:00:00Z"})
        any_sub = await org.get("psync_marketingpreferencesubscriptions?$select="
                                "_psync_contactid_value&$filter=_psync_contactid_value ne null"
                                "&$top=1")
        contact = any_sub.json["value"][0]["_psync_contactid_value"]
        await org.call("PATCH", f"contacts({contact})", json={"donotemail": True},
                       headers={"If-Match": "*"})
        later = await _contacts(org, "$filter=modifiedon ge 2024-05-01T12:00:00Z")
        assert [r["contactid"] for r in later] == [contact]
        assert later[0]["modifiedon"] == "2024-05-02T10:00:00Z"
        before = await _contacts(org, "$filter=modifiedon lt 2024-05-02T00:00:00Z")
        assert len(before) == seeded["contacts"] - 1
        assert before[0]["modifiedon"] == "2024-05-01T10:00:00Z"  # whole seconds
        subs = await org.get(
            "psync_marketingpreferencesubscriptions?$select=psync_status,_psync_contactid_value"
            f"&$filter=_psync_contactid_value eq {contact}")
        assert subs.status == 200
        assert subs.json["value"]
        assert {r["_psync_contactid_value"] for r in subs.json["value"]} == {contact}


async def test_orderby_top_and_count() -> None:
    async with organisation() as org:
        await _people(org)
        body = (await org.get("contacts?$select=firstname&$orderby=donotbulkemail desc,"
                              "firstname asc&$count=true")).json
        assert [r["firstname"] for r in body["value"]] == ["Bob", "Ann", "Cy"]
        assert body["@odata.count"] == 3
        top = (await org.get("contacts?$select=firstname&$orderby=firstname desc&$top=2")).json
        assert [r["firstname"] for r in top["value"]] == ["Cy", "Bob"]
        assert "@odata.nextLink" not in top
        count = await org.get("contacts/$count")
        assert count.status == 200
        assert count.headers["Content-Type"].startswith("text/plain")
        assert count.text.lstrip("\ufeff") == "3"


async def test_ordered_paging_by_modifiedon_is_stable() -> None:
    async with organisation() as org:
        await org.sim("PUT", "clock", {"freeze_at": "2024-05-01T10:00:00Z"})
        await org.seed(records=12)
        url = f"{org.api}/contacts?$select=modifiedon&$orderby=modifiedon asc,contactid asc"
        seen: list[str] = []
        while url:
            body = (await org.get(url, headers={"Prefer": "odata.maxpagesize=4"})).json
            seen += [r["contactid"] for r in body["value"]]
            url = body.get("@odata.nextLink", "")
        assert seen == sorted(seen) and len(seen) == len(set(seen))


async def test_refused_options_and_unknown_columns() -> None:
    async with organisation() as org:
        skip = await org.get("contacts?$skip=10")
        assert skip.status == 400
        assert skip.error["code"] == "0x80060888"
        assert "$skip" in skip.error["message"]
        unknown = await org.get("contacts?$select=fullname,nosuch")
        assert unknown.status == 400
        assert unknown.error == {"code": "0x80060888", "message": "Could not find a property "
                                 "named 'nosuch' on type 'Microsoft.Dynamics.CRM.contact'."}
        assert (await org.get("contacts?$filter=nosuch eq 1")).status == 400
        assert (await org.get("contacts?$Select=fullname")).status == 400  # case-sensitive
        assert (await org.get("contacts?$filter=donotemail eq 'yes'")).status == 400
        assert (await org.get("contacts?$filter=tolower(fullname) eq 'x'")).status == 400
        assert (await org.get("nosuchset")).status == 404


async def test_expand_a_lookup_on_subscriptions() -> None:
    async with organisation() as org:
        await org.seed(records=4, preferences=2)
        body = (await org.get(
            "psync_marketingpreferencesubscriptions?$select=psync_status"
            "&$expand=psync_contactid($select=emailaddress1),psync_preferenceid($select="
            "psync_ecpreferenceid)")).json
        rows = body["value"]
        assert rows
        with_contact = [r for r in rows if r["psync_contactid"] is not None]
        assert with_contact
        assert set(with_contact[0]["psync_contactid"]) == {"@odata.etag", "emailaddress1",
                                                            "contactid"}
        assert all(r["psync_preferenceid"]["psync_ecpreferenceid"] >= 1000 for r in rows)


async def test_get_by_key_entity_context_404_and_304() -> None:
    async with organisation() as org:
        ids = await _people(org)
        one = await org.get(f"contacts({ids['Ann']})?$select=fullname")
        assert one.status == 200
        assert one.json["@odata.context"].endswith("$metadata#contacts(fullname)/$entity")
        assert one.json["fullname"] == "Ann O'Hara"
        etag = one.json["@odata.etag"]
        same = await org.get(f"contacts({ids['Ann']})", headers={"If-None-Match": etag})
        assert same.status == 304
        missing = await org.get("contacts(00000000-0000-0000-0000-000000000001)")
        assert missing.status == 404
        assert missing.error["code"] == "0x80040217"
        prop = await org.get(f"contacts({ids['Bob']})/emailaddress1")
        assert prop.json["value"] == "BOB@Example.com"
        assert one.headers["Content-Type"] == "application/json; odata.metadata=minimal"


async def test_formatted_values_and_lookup_annotations_on_request() -> None:
    async with organisation() as org:
        await org.sim("PUT", "clock", {"freeze_at": "2023-04-07T21:59:01Z"})
        await org.seed(records=4, preferences=2)
        plain = (await org.get("contacts?$select=donotbulkemail&$top=1")).json["value"][0]
        assert not any("@" in k for k in plain if k != "@odata.etag")
        answer = await org.get(
            "psync_marketingpreferencesubscriptions?$select=psync_status,modifiedon,"
            "_psync_preferenceid_value&$top=1",
            headers={"Prefer": 'odata.include-annotations="*"'})
        row = answer.json["value"][0]
        assert row["psync_status@OData.Community.Display.V1.FormattedValue"] in (
            "Opted in", "Opted out")
        assert row["modifiedon@OData.Community.Display.V1.FormattedValue"] == "4/7/2023 9:59 PM"
        assert row["_psync_preferenceid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == (
            "psync_marketingpreference")
        contact = (await org.get("contacts?$select=donotbulkemail&$top=1", headers={
            "Prefer": 'odata.include-annotations="OData.Community.Display.V1.FormattedValue"'})
        ).json["value"][0]
        assert contact["donotbulkemail@OData.Community.Display.V1.FormattedValue"] == "Allow"
