"""Change feeds: opt-ins-since, with-preference, suppressed-since, unsubscribed-since, dates."""

from __future__ import annotations

from typing import Any

import pytest

from tests.simulators.test_dotdigital_support import Sim, running

pytestmark = pytest.mark.anyio


async def _emails(sim: Sim, count: int) -> list[str]:
    """The first ``count`` contacts' emails, in contact-id order."""
    page = await sim.ok("GET", f"/contacts/v3?limit={count}")
    return [c["identifiers"]["email"] for c in page["_items"]]


async def _all_opt_in_pages(sim: Sim, pref: int, date: str, key: str = "minContactId"
                            ) -> list[list[dict[str, Any]]]:
    pages: list[list[dict[str, Any]]] = []
    min_id = 0
    while True:
        page = await sim.ok("GET", f"/v2/contacts/with-preference/{pref}/opt-ins-since/{date}"
                                   f"?{key}={min_id}")
        if not page:
            return pages
        pages.append(page)
        min_id = page[-1]["contact"]["id"] + 1


async def test_opt_ins_since_pages_by_min_contact_id_with_opt_outs() -> None:
    async with running() as sim:
        seeded = await sim.seed(records=3000, preferences=2, seed=11)
        pref = seeded["preferences"][1]
        pages = await _all_opt_in_pages(sim, pref, "2000-01-01")
        assert len(pages) == 3 and [len(p) for p in pages][:2] == [1000, 1000]
        rows = [row for page in pages for row in page]
        ids = [r["contact"]["id"] for r in rows]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        states = [r["marketingPreferenceOptIns"][0]["isOptedIn"] for r in rows]
        assert True in states and False in states  # opt-outs are part of the feed
        assert all(r["marketingPreferenceOptIns"][0]["marketingPreferenceId"] == pref for r in rows)
        assert rows[0]["contact"]["dataFields"] is None
        # Contacts that never had a state for the preference are not in the feed.
        assert 2000 < len(rows) < 3000
        # minContactId is inclusive, and minContactID is accepted too.
        again = await sim.ok("GET", f"/v2/contacts/with-preference/{pref}/opt-ins-since/2000-01-01"
                                    f"?minContactID={ids[1500]}")
        assert again[0]["contact"]["id"] == ids[1500]


async def test_opt_ins_since_returns_only_changes_from_the_date_on() -> None:
    async with running() as sim:
        seeded = await sim.seed(records=1500, preferences=1)
        pref = seeded["preferences"][0]
        emails = await _emails(sim, 1500)
        await sim.freeze("2030-01-01T00:00:00.000Z")
        await sim.ok("PUT", f"/v2/contacts/{emails[1400]}/preferences",
                     json=[{"id": pref, "isPreference": True, "isOptedIn": False}])
        await sim.ok("PUT", f"/v2/contacts/{emails[3]}/preferences",
                     json=[{"id": pref, "isPreference": True, "isOptedIn": True}])
        changed = await sim.ok("GET", f"/v2/contacts/with-preference/{pref}/opt-ins-since/"
                                      "2030-01-01T00:00:00Z")
        assert [r["contact"]["email"] for r in changed] == [emails[3], emails[1400]]
        assert [r["marketingPreferenceOptIns"][0]["isOptedIn"] for r in changed] == [True, False]
        later = await sim.ok("GET", f"/v2/contacts/with-preference/{pref}/opt-ins-since/"
                                    "2030-01-01T00:00:00.001Z")
        assert later == []


@pytest.mark.parametrize("date", [
    "2030-01-01",
    "2030-01-01T00:00:00Z",
    "2030-01-01T00:00:00.000Z",
    "2030-01-01T00:00:00+00:00",
    "2030-01-01T00:00:00%2B00:00",
    "2030-01-01T00:00:00%2b0000",
    "2030-01-01T00:00:00+0000",
    "2030-01-01T01:00:00+01:00",
    "2029-12-31T19:00:00-0500",
    "2030-01-01T00:00:00.0000000",
    "2030-01-01T00:00",
])
async def test_every_path_date_format_means_the_same_instant(date: str) -> None:
    async with running() as sim:
        seeded = await sim.seed(records=3, preferences=1)
        email, pref = seeded["emails"][0], seeded["preferences"][0]
        await sim.freeze("2030-01-01T00:00:00.000Z")
        await sim.ok("PUT", f"/v2/contacts/{email}/preferences",
                     json=[{"id": pref, "isPreference": True, "isOptedIn": True}])
        await sim.ok("POST", "/v2/contacts/unsubscribe", json={"email": email})
        for path in (f"/v2/contacts/with-preference/{pref}/opt-ins-since/{date}",
                     f"/v2/contacts/suppressed-since/{date}",
                     f"/v2/contacts/unsubscribed-since/{date}",
                     f"/v2/preferences/modified-since/{date}"):
            answer = await sim.call("GET", path, raw_path=True)
            assert answer.status == 200, (path, answer.text)
            if "preferences/modified" not in path:
                assert len(answer.body) == 1, path


@pytest.mark.parametrize("date", ["yesterday", "2030-13-01", "2030-01-01T25:00:00Z",
                                  "01-02-2030", "2030-01-01T00:00:00+99:00", "2030-1-1"])
async def test_a_bad_path_date_is_a_parameter_error(date: str) -> None:
    async with running() as sim:
        seeded = await sim.seed(records=1, preferences=1)
        for path in (f"/v2/contacts/with-preference/{seeded['preferences'][0]}/opt-ins-since/",
                     "/v2/contacts/suppressed-since/", "/v2/contacts/unsubscribed-since/",
                     "/v2/preferences/modified-since/"):
            answer = await sim.call("GET", path + date)
            assert answer.status == 400, path
            assert answer.body["message"].endswith("ERROR_PARAMETER_INVALID")


async def test_with_preference_lists_opted_in_contacts_only() -> None:
    async with running() as sim:
        seeded = await sim.seed(records=1200, preferences=1, seed=5)
        pref = seeded["preferences"][0]
        first = await sim.ok("GET", f"/v2/contacts/with-preference/{pref}")
        assert len(first) == 0 or set(first[0]) == {"id", "email"}
        rest = await sim.ok("GET", f"/v2/contacts/with-preference/{pref}"
                                   f"?minContactId={first[-1]['id'] + 1}")
        opted = {r["contact"]["id"] for page in await _all_opt_in_pages(sim, pref, "2000-01-01")
                 for r in page if r["marketingPreferenceOptIns"][0]["isOptedIn"]}
        assert {c["id"] for c in first + rest} == opted
        category = await sim.call("GET", "/v2/contacts/with-preference/424242")
        assert category.status == 404


async def test_suppressed_and_unsubscribed_since_page_with_select_and_skip() -> None:
    async with running() as sim:
        seeded = await sim.seed(records=30, preferences=1)
        emails = await _emails(sim, 30)
        await sim.freeze("2031-01-01T00:00:00.000Z")
        for email in emails[:12]:
            await sim.ok("POST", "/v2/contacts/unsubscribe", json={"email": email})
        await sim.freeze("2031-01-02T00:00:00.000Z")
        suppressed = await sim.ok("PUT", "/v2/contacts/suppress-contacts", json=[
            {"email": e} for e in emails[12:17]] + [{"id": seeded["first_contact_id"] + 17},
                                                    {"email": "unknown@example.com"}])
        assert len(suppressed["suppressed"]) == 6
        assert suppressed["notFound"] == [{"id": 0, "email": "unknown@example.com"}]
        await sim.freeze("2031-01-03T00:00:00.000Z")
        await sim.edit(emails[20], status="HardBounced")
        pages: list[dict[str, Any]] = []
        for skip in range(0, 40, 7):
            pages.extend(await sim.ok("GET", f"/v2/contacts/suppressed-since/2031-01-01"
                                             f"?select=7&skip={skip}"))
        assert len(pages) == 19
        assert [p["suppressedContact"]["email"] for p in pages[:12]] == emails[:12]
        assert {p["reason"] for p in pages} == {"Unsubscribed", "Suppressed", "HardBounced"}
        assert all(p["reason"] == p["suppressedContact"]["status"] for p in pages)
        assert pages[0]["dateRemoved"] == "2031-01-01T00:00:00.000Z"
        unsubscribed = await sim.ok("GET",
                                    "/v2/contacts/unsubscribed-since/2031-01-01?select=1000")
        assert [u["suppressedContact"]["email"] for u in unsubscribed] == emails[:12]
        assert await sim.ok("GET", "/v2/contacts/suppressed-since/2031-01-02T00:00:00.001Z") == [
            p for p in pages if p["reason"] == "HardBounced"]
        for query in ("select=0", "select=1001", "skip=-1", "select=x"):
            bad = await sim.call("GET", f"/v2/contacts/suppressed-since/2031-01-01?{query}")
            assert bad.status == 400 and "ERROR_PARAMETER_INVALID" in bad.body["message"], query
