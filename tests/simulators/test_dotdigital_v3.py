"""v3 contacts: get, patch, list with ~modified/~created and markers, the import."""

from __future__ import annotations

from typing import Any

import pytest

from tests.simulators.test_dotdigital_support import USER_A, USER_B, Sim, basic, running

pytestmark = pytest.mark.anyio


async def _all_pages(sim: Sim, path: str) -> list[list[dict[str, Any]]]:
    pages = []
    answer = await sim.ok("GET", path)
    while True:
        pages.append(answer["_items"])
        assert answer["_links"]["self"]["link"].startswith(sim.url)
        following = answer["_links"].get("next")
        if following is None:
            return pages
        answer = await sim.ok("GET", following["link"][len(sim.url):])


async def test_patch_creates_with_201_then_updates_with_200() -> None:
    async with running() as sim:
        seeded = await sim.seed(records=0, preferences=3)
        p1, p2, p3 = seeded["preferences"]
        await sim.freeze("2027-01-01T00:00:00.000Z")
        created = await sim.ok("PATCH", "/contacts/v3/email/new%2Bone@example.com", expect=201,
                               json={"dataFields": {"firstName": "Ann", "lastName": "Lee"},
                                     "channelProperties": {"email": {"emailType": "html",
                                                                     "optInType": "double"}},
                                     "preferences": [{"id": p1, "isOptedIn": True},
                                                     {"id": p2, "isOptedIn": False}]})
        assert created["identifiers"] == {"email": "new+one@example.com"}
        assert created["status"] == "subscribed"
        assert created["channelProperties"]["email"] == {
            "emailType": "Html", "optInType": "Double", "status": "subscribed"}
        assert [p["id"] for p in created["preferences"]] == [p1]  # opted-in ones only
        assert created["dataFields"] == {"FIRSTNAME": "Ann", "LASTNAME": "Lee"}
        await sim.freeze("2027-01-02T00:00:00.000Z")
        updated = await sim.ok("PATCH", "/contacts/v3/email/NEW+ONE@example.com"
                                        "?merge-option=overwrite-if-empty", raw_path=True,
                               json={"dataFields": {"firstName": "Bea", "gender": "f"},
                                     "preferences": [{"id": p3, "isOptedIn": True}]})
        assert updated["contactId"] == created["contactId"]
        assert updated["dataFields"] == {"FIRSTNAME": "Ann", "LASTNAME": "Lee", "GENDER": "f"}
        assert updated["updated"] == "2027-01-02T00:00:00.000Z"
        assert updated["created"] == "2027-01-01T00:00:00.000Z"
        assert [p["id"] for p in updated["preferences"]] == [p1, p3]
        again = await sim.ok("PATCH", f"/contacts/v3/contactId/{created['contactId']}",
                             json={"dataFields": {"lastName": None}})
        assert "LASTNAME" not in again["dataFields"]
        subs = await sim.ok("GET", "/v2/contacts/new%2Bone%40example.com/subscriptions")
        stamps = {o["marketingPreferenceId"]: o["dateModifed"]
                  for o in subs["marketingPreferenceOptIns"]}
        assert stamps == {p1: "2027-01-01T00:00:00.000Z", p2: "2027-01-01T00:00:00.000Z",
                          p3: "2027-01-02T00:00:00.000Z"}
        fetched = await sim.ok("GET", f"/contacts/v3/contactId/{created['contactId']}")
        assert fetched["identifiers"]["email"] == "new+one@example.com"


async def test_v3_errors_use_the_v3_shape() -> None:
    async with running() as sim:
        seeded = await sim.seed(records=2, preferences=1)
        email = seeded["emails"][0]
        cases: list[tuple[str, str, Any, int, str]] = [
            ("GET", "/contacts/v3/email/nobody@example.com", None, 404, "contacts:contactNotFound"),
            ("GET", "/contacts/v3/contactId/abc", None, 400, "contacts:invalidId"),
            ("GET", "/contacts/v3/email/not-an-email", None, 400, "contacts:invalidId"),
            ("GET", "/contacts/v3/shoeSize/42", None, 400, "contacts:invalidId"),
            ("PATCH", "/contacts/v3/contactId/999999", {"dataFields": {}}, 404,
             "contacts:contactNotFound"),
            ("PATCH", "/contacts/v3/mobileNumber/447000000000", {}, 400, "contacts:badJson"),
            ("PATCH", f"/contacts/v3/email/{email}", {"preferences": [{"id": 1}]}, 400,
             "contacts:badJson"),
            ("PATCH", f"/contacts/v3/email/{email}", {"preferences": [{"id": 5, "isOptedIn": True}]},
             400, "contacts:invalidPreferences"),
            ("PATCH", f"/contacts/v3/email/{email}", {"identifiers": {"email": seeded["emails"][1]}},
             409, "contacts:idAlreadyExists"),
            ("PATCH", f"/contacts/v3/email/{email}",
             {"channelProperties": {"email": {"status": "bouncy"}}}, 400, "contacts:badJson"),
            ("PATCH", f"/contacts/v3/email/{email}?merge-option=sometimes", {}, 400,
             "contacts:invalidParameter"),
            ("GET", "/contacts/v3?~modified=gte::2024-01-01", None, 400, "contacts:invalidFilter"),
            ("GET", "/contacts/v3?~modified=lte::2024-01-01T00:00:00Z", None, 400,
             "contacts:invalidFilter"),
            ("GET", "/contacts/v3?~modified=gte::2024-01-01T00:00:00Z"
                    "&~created=gte::2024-01-01T00:00:00Z", None, 400, "contacts:invalidFilter"),
            ("GET", "/contacts/v3?~listId=5", None, 400, "contacts:invalidFilter"),
            ("GET", "/contacts/v3?limit=5001", None, 400, "contacts:invalidParameter"),
            ("GET", "/contacts/v3?limit=0", None, 400, "contacts:invalidParameter"),
            ("GET", "/contacts/v3?include=everything", None, 400, "contacts:invalidParameter"),
            ("GET", "/contacts/v3?marker=bm9wZQ", None, 400, "contacts:invalidMarker"),
            ("GET", "/contacts/v3/import/d7de900d-d337-43f6-b1e1-c8ec73e1a434", None, 404,
             "contacts:importNotFound"),
            ("PUT", "/contacts/v3/import", {"contacts": []}, 400, "contacts:noContactsSpecified"),
            ("PUT", "/contacts/v3/import", {"contacts": [{"identifiers": {"email": "a@b.io"}}]},
             400, "contacts:badJson"),
            ("PUT", "/contacts/v3/import", {"mergeOption": "merge", "contacts": [
                {"matchIdentifier": "email", "identifiers": {"email": "a@b.io"}}]}, 400,
             "contacts:badJson"),
            ("GET", "/contacts/v3/a/b/c", None, 404, "contacts:resourceNotFound"),
        ]
        for method, path, body, status, code in cases:
            answer = await sim.call(method, path, json=body)
            assert (answer.status, answer.body["errorCode"]) == (status, code), path
            assert isinstance(answer.body["description"], str)
        for payload in (b"", b"{", b"[1"):
            async with sim.session.patch(f"{sim.url}/contacts/v3/email/{email}", data=payload,
                                         headers={"Content-Type": "application/json",
                                                  **basic(USER_A)}) as response:
                body = await response.json()
                assert (response.status, body["errorCode"]) == (400, "contacts:badJson")


async def test_list_pages_by_modified_time_then_id() -> None:
    async with running() as sim:
        seeded = await sim.seed(records=120, preferences=1, seed=4)
        pref = seeded["preferences"][0]
        everyone = [c for page in await _all_pages(sim, "/contacts/v3?limit=50") for c in page]
        assert [c["contactId"] for c in everyone] == sorted(c["contactId"] for c in everyone)
        assert len(everyone) == 120 and "preferences" not in everyone[0]
        await sim.freeze("2028-01-01T00:00:00.000Z")
        late = [everyone[90]["identifiers"]["email"], everyone[5]["identifiers"]["email"]]
        for email in late:
            await sim.ok("PATCH", f"/contacts/v3/email/{email}",
                         json={"preferences": [{"id": pref, "isOptedIn": True}]})
        await sim.freeze("2028-01-01T00:00:00.500Z")
        await sim.ok("PUT", f"/v2/contacts/{everyone[40]['identifiers']['email']}/preferences",
                     json=[{"id": pref, "isPreference": True, "isOptedIn": False}])
        changed = [c for page in await _all_pages(
            sim, "/contacts/v3?~modified=gte::2028-01-01T00:00:00Z&include=preferences|lists"
                 "&limit=1") for c in page]
        assert [c["contactId"] for c in changed] == [everyone[5]["contactId"],
                                                     everyone[90]["contactId"],
                                                     everyone[40]["contactId"]]
        assert changed[0]["preferences"][0]["id"] == pref
        assert "preferences" not in changed[2]  # opted out: not listed
        assert changed[0]["lists"][0]["status"] == "subscribed"
        recent = await sim.ok("GET", "/contacts/v3?~modified=gte::2028-01-01T00:00:00.500Z"
                                     "&data-fields=FIRSTNAME&include=channelProperties")
        assert [c["contactId"] for c in recent["_items"]] == [everyone[40]["contactId"]]
        assert set(recent["_items"][0]["dataFields"]) == {"FIRSTNAME"}
        assert "next" not in recent["_links"]
        created = await sim.ok("GET", "/contacts/v3?~created=gte::2028-01-01T00:00:00Z")
        assert created["_items"] == []


async def test_a_contact_changed_between_pages_is_seen_again_later() -> None:
    async with running() as sim:
        await sim.seed(records=30, preferences=1)
        first = await sim.ok("GET", "/contacts/v3?~modified=gte::2000-01-01T00:00:00Z&limit=10")
        early = first["_items"][0]["identifiers"]["email"]
        await sim.freeze("2099-01-01T00:00:00.000Z")
        await sim.ok("PATCH", f"/contacts/v3/email/{early}", json={"dataFields": {"x": "1"}})
        rest = [c for page in await _all_pages(sim, first["_links"]["next"]["link"][len(sim.url):])
                for c in page]
        assert len(rest) == 21 and rest[-1]["identifiers"]["email"] == early


async def _finish(sim: Sim, import_id: str) -> dict[str, Any]:
    await sim.ok("POST", "/_sim/dotdigital/imports/run", user=None)
    report = await sim.ok("GET", f"/contacts/v3/import/{import_id}")
    assert report["status"] == "Finished"
    return dict(report)


async def test_import_lifecycle_results_and_failures() -> None:
    async with running(import_delay_s=30.0) as sim:
        seeded = await sim.seed(records=3, preferences=2)
        p1, p2 = seeded["preferences"]
        kept, suppressed, _ = seeded["emails"]
        await sim.ok("POST", "/v2/contacts/unsubscribe", json={"email": suppressed})
        before = await sim.ok("GET", f"/v2/contacts/{suppressed}/subscriptions")
        started = await sim.ok("PUT", "/contacts/v3/import", expect=202, json={
            "mergeOption": "overwrite",
            "contacts": [
                {"matchIdentifier": "email", "identifiers": {"email": "Fresh@Example.com"},
                 "dataFields": {"firstName": "Fay"}, "preferences": [{"id": p1, "isOptedIn": True}]},
                {"matchIdentifier": "email", "identifiers": {"email": kept},
                 "preferences": [{"id": p2, "isOptedIn": False}]},
                {"matchIdentifier": "email", "identifiers": {"email": suppressed},
                 "dataFields": {"firstName": "Sam"}, "preferences": [{"id": p1, "isOptedIn": True}]},
                {"matchIdentifier": "email", "identifiers": {"email": "bob@example@io.com"}},
                {"matchIdentifier": "email", "identifiers": {"email": "fresh@example.com"}},
                {"matchIdentifier": "contactId", "identifiers": {"contactId": 987654}},
                {"matchIdentifier": "email", "identifiers": {"email": kept},
                 "preferences": [{"id": 4242, "isOptedIn": True}]},
            ]})
        import_id = started["importId"]
        waiting = await sim.ok("GET", f"/contacts/v3/import/{import_id}")
        assert waiting == {"importId": import_id, "status": "NotFinished"}
        assert (await sim.call("GET", "/v2/contacts/fresh@example.com")).status == 404
        await sim.freeze("2029-09-09T09:09:09.999Z")
        report = await _finish(sim, import_id)
        assert report["summary"] == {"newContacts": 1, "updatedContacts": 2,
                                     "globallySuppressed": 1, "invalidEntries": 2,
                                     "duplicateIdentifiers": 2}
        assert [c["identifiers"]["email"] for c in report["created"]] == ["Fresh@Example.com"]
        assert {c["identifiers"]["email"] for c in report["updated"]} == {kept, suppressed}
        codes = {f["identifiers"].get("email", f["identifiers"].get("contactId")):
                 [x["failureCode"] for x in f["failures"]] for f in report["failures"]}
        assert codes == {suppressed: ["preferencesNotApplied"],
                         "bob@example@io.com": ["invalidEmail"],
                         "fresh@example.com": ["duplicateIdentifier"],
                         987654: ["contactNotFound"], kept: ["duplicateIdentifier"]}
        after = await sim.ok("GET", f"/v2/contacts/{suppressed}/subscriptions")
        assert after["marketingPreferenceOptIns"] == before["marketingPreferenceOptIns"]
        fresh = await sim.ok("GET", "/v2/contacts/fresh@example.com/subscriptions")
        assert fresh["marketingPreferenceOptIns"] == [{
            "marketingPreferenceId": p1, "addressBookId": 0, "isOptedIn": True,
            "dateModifed": "2029-09-09T09:09:09.999Z"}]
        kept_subs = await sim.ok("GET", f"/v2/contacts/{kept}/subscriptions")
        assert {o["marketingPreferenceId"]: o["isOptedIn"]
                for o in kept_subs["marketingPreferenceOptIns"]}[p2] is False


async def test_import_applies_by_itself_after_its_delay() -> None:
    async with running(import_delay_s=0.0) as sim:
        await sim.seed(records=0, preferences=1)
        started = await sim.ok("PUT", "/contacts/v3/import", expect=202, json={"contacts": [
            {"matchIdentifier": "email", "identifiers": {"email": "auto@example.com"}}]})
        for _ in range(200):
            report = await sim.ok("GET", f"/contacts/v3/import/{started['importId']}")
            if report["status"] == "Finished":
                break
        assert report["summary"]["newContacts"] == 1


async def test_at_most_25_active_imports_per_account() -> None:
    async with running(import_delay_s=60.0) as sim:
        body = {"contacts": [{"matchIdentifier": "email", "identifiers": {"email": "q@x.io"}}]}
        for _ in range(25):
            await sim.ok("PUT", "/contacts/v3/import", expect=202, json=body)
        refused = await sim.call("PUT", "/contacts/v3/import", json=body)
        assert refused.status == 429
        assert refused.body["errorCode"] == "contacts:tooManyActiveImports"
        assert (await sim.call("PUT", "/contacts/v3/import", json=body, user=USER_B)).status == 202
        await sim.ok("POST", "/_sim/dotdigital/imports/run", user=None)
        assert (await sim.call("PUT", "/contacts/v3/import", json=body)).status == 202
