"""v2 contacts: create/get, unsubscribe, resubscribe variants, suppress, address books."""

from __future__ import annotations

import pytest

from tests.simulators.test_dotdigital_support import running

pytestmark = pytest.mark.anyio


async def test_contact_create_update_and_get() -> None:
    async with running() as sim:
        created = await sim.ok("POST", "/v2/contacts", expect=201, json={
            "email": "Jane.Doe@Example.com", "optInType": "double", "emailType": 0,
            "dataFields": [{"key": "FirstName", "value": "Jane"}]})
        assert created["optInType"] == "Double" and created["emailType"] == "PlainText"
        assert created["dataFields"] == [{"key": "FIRSTNAME", "value": "Jane"}]
        assert created["status"] == "Subscribed"
        updated = await sim.ok("POST", "/v2/contacts", json={
            "EMAIL": "jane.doe@example.com", "DATAFIELDS": [{"KEY": "LASTNAME", "VALUE": "Doe"}]})
        assert updated["id"] == created["id"] and updated["email"] == "Jane.Doe@Example.com"
        by_id = await sim.ok("GET", f"/v2/contacts/{created['id']}")
        assert {f["key"] for f in by_id["dataFields"]} == {"FIRSTNAME", "LASTNAME"}
        assert (await sim.ok("GET", "/v2/contacts/JANE.DOE%40EXAMPLE.COM"))["id"] == created["id"]
        bodies: tuple[object, ...] = (
            {"email": "not-an-email"}, {"email": "a@b.io", "optInType": "Sometimes"}, [])
        for body in bodies:
            bad = await sim.call("POST", "/v2/contacts", json=body)
            assert bad.status == 400 and bad.body["message"].endswith("ERROR_PARAMETER_INVALID")
        broken = await sim.call("POST", "/v2/contacts", headers={"Content-Type": "application/json"})
        assert broken.status == 400


async def test_unsubscribe_records_a_suppression_and_hides_the_contact_by_id() -> None:
    async with running() as sim:
        created = await sim.ok("POST", "/v2/contacts", expect=201, json={"email": "u@example.com"})
        await sim.freeze("2026-02-02T02:02:02.020Z")
        answer = await sim.ok("POST", "/v2/contacts/unsubscribe", json={"Email": "U@example.com"})
        assert answer["reason"] == "Unsubscribed"
        assert answer["dateRemoved"] == "2026-02-02T02:02:02.020Z"
        assert answer["suppressedContact"]["status"] == "Unsubscribed"
        # Unsubscribing again keeps the first date.
        await sim.freeze("2026-03-03T00:00:00.000Z")
        again = await sim.ok("POST", "/v2/contacts/unsubscribe", json={"email": "u@example.com"})
        assert again["dateRemoved"] == "2026-02-02T02:02:02.020Z"
        hidden = await sim.call("GET", f"/v2/contacts/{created['id']}")
        assert hidden.status == 404
        assert (await sim.ok("GET", "/v2/contacts/u@example.com"))["status"] == "Unsubscribed"
        # An unknown address is added as unsubscribed.
        added = await sim.ok("POST", "/v2/contacts/unsubscribe", json={"email": "new@example.com"})
        assert added["suppressedContact"]["id"] > created["id"]


async def test_resubscribe_with_challenge_goes_pending_until_confirmed() -> None:
    async with running() as sim:
        await sim.ok("POST", "/v2/contacts", expect=201, json={"email": "r@example.com"})
        await sim.ok("POST", "/v2/contacts/unsubscribe", json={"email": "r@example.com"})
        answer = await sim.ok("POST", "/v2/contacts/resubscribe", json={
            "UnsubscribedContact": {"Email": "r@example.com",
                                    "DataFields": [{"Key": "FIRSTNAME", "Value": "Rae"}]},
            "PreferredLocale": "en-EN", "ReturnUrlToUseIfChallenged": "https://x.example/ok"})
        assert answer["status"] == "ContactChallenged"
        assert answer["contact"]["status"] == "PendingOptIn"
        assert await sim.ok("GET", "/v2/contacts/unsubscribed-since/2000-01-01") == []
        confirmed = await sim.edit("r@example.com", status="Subscribed")
        assert confirmed["contact"]["status"] == "Subscribed"
        fields = (await sim.ok("GET", "/v2/contacts/r@example.com"))["dataFields"]
        assert fields == [{"key": "FIRSTNAME", "value": "Rae"}]


async def test_resubscribe_without_challenge_and_what_cannot_be_lifted() -> None:
    async with running() as sim:
        for email in ("a@example.com", "b@example.com", "c@example.com", "d@example.com"):
            await sim.ok("POST", "/v2/contacts", expect=201, json={"email": email})
        await sim.ok("POST", "/v2/contacts/unsubscribe", json={"email": "a@example.com"})
        await sim.edit("b@example.com", status="HardBounced")
        await sim.edit("c@example.com", status="IspComplained")
        await sim.edit("d@example.com", status="DirectComplaint")
        lifted = await sim.ok("POST", "/v2/contacts/resubscribe-with-no-challenge",
                              json={"unsubscribedContact": {"email": "a@example.com"}})
        assert (lifted["status"], lifted["contact"]["status"]) == ("ContactAdded", "Subscribed")
        for email, status in (("b@example.com", "HardBounced"), ("c@example.com", "IspComplained"),
                              ("d@example.com", "DirectComplaint")):
            for path in ("/v2/contacts/resubscribe", "/v2/contacts/resubscribe-with-no-challenge"):
                refused = await sim.ok("POST", path, json={"unsubscribedContact": {"email": email}})
                assert refused["status"] == "ContactCannotBeUnsuppressed"
                assert refused["contact"]["status"] == status
        fresh = await sim.ok("POST", "/v2/contacts/resubscribe",
                             json={"unsubscribedContact": {"email": "e@example.com"}})
        assert fresh["status"] == "ContactAdded"
        missing = await sim.call("POST", "/v2/contacts/resubscribe", json={"email": "a@example.com"})
        assert missing.status == 400


async def test_address_books_list_create_and_add() -> None:
    async with running() as sim:
        books = await sim.ok("GET", "/v2/address-books")
        assert [b["name"] for b in books] == ["Test"]
        book = await sim.ok("POST", "/v2/address-books",
                            json={"name": "Newsletter", "visibility": "Public"})
        assert book["visibility"] == "Public" and book["contacts"] == 0
        for name in ("newsletter", "Test", "All Contacts"):
            dup = await sim.call("POST", "/v2/address-books", json={"name": name})
            assert dup.status == 400 and "ERROR_ADDRESSBOOK_DUPLICATE" in dup.body["message"]
        added = await sim.ok("POST", f"/v2/address-books/{book['id']}/contacts",
                             json={"email": "l@example.com"})
        assert added["email"] == "l@example.com"
        listed = {b["id"]: b for b in await sim.ok("GET", "/v2/address-books?select=10&skip=0")}
        assert listed[book["id"]]["contacts"] == 1
        missing = await sim.call("POST", "/v2/address-books/999999/contacts",
                                 json={"email": "l@example.com"})
        assert missing.status == 404 and "ERROR_ADDRESSBOOK_NOT_FOUND" in missing.body["message"]
        await sim.ok("POST", "/v2/contacts/unsubscribe", json={"email": "s@example.com"})
        refused = await sim.call("POST", f"/v2/address-books/{book['id']}/contacts",
                                 json={"email": "s@example.com"})
        assert refused.status == 400 and "ERROR_CONTACT_SUPPRESSED" in refused.body["message"]
        # The opt-in records name the contact's list.
        seeded_pref = await sim.ok("POST", "/v2/preferences", json={
            "publicName": "P", "privateName": "p", "isPreference": True})
        await sim.ok("PUT", "/v2/contacts/l@example.com/preferences",
                     json=[{"id": seeded_pref["id"], "isPreference": True, "isOptedIn": True}])
        subs = await sim.ok("GET", "/v2/contacts/l@example.com/subscriptions")
        assert subs["marketingPreferenceOptIns"][0]["addressBookId"] == book["id"]
