"""Accounts, Basic auth, isolation between accounts, rate limits and error shapes."""

from __future__ import annotations

import re

import aiohttp
import pytest

from services.simulators.dotdigital import DotdigitalSimulator
from services.simulators.dotdigital.accounts import AccountError
from tests.simulators.test_dotdigital_support import USER_A, USER_A2, USER_B, running

pytestmark = pytest.mark.anyio
DENIED = {"message": "Authorization has been denied for this request."}


async def test_bad_credentials_are_refused_in_the_vendor_shape() -> None:
    async with running() as sim:
        for user in (None, (USER_A[0], "wrong-pass-1"), ("nobody@x.com", USER_A[1])):
            for path in ("/v2/account-info", "/contacts/v3/email/a@b.io"):
                answer = await sim.call("GET", path, user=user)
                assert answer.status == 401
                assert answer.body == DENIED
        garbled = await sim.call("GET", "/v2/account-info", user=None,
                                 headers={"Authorization": "Basic !!notbase64"})
        assert garbled.status == 401


async def test_account_info_reports_the_endpoint_the_request_reached() -> None:
    async with running() as sim:
        info = await sim.ok("GET", "/v2/account-info")
        props = {p["name"]: p["value"] for p in info["properties"]}
        assert info["id"] == 101
        assert props["ApiEndpoint"] == sim.url
        assert props["MainEmail"] and props["APILocale"]
        second = await sim.ok("GET", "/v2/account-info", user=USER_A2)
        assert second["id"] == 101
        other = await sim.ok("GET", "/v2/account-info", user=USER_B)
        assert other["id"] == 202


async def test_server_time_is_a_utc_string_with_milliseconds() -> None:
    async with running() as sim:
        await sim.freeze("2025-03-04T05:06:07.891Z")
        assert await sim.ok("GET", "/v2/server-time") == "2025-03-04T05:06:07.891Z"
        await sim.ok("PUT", "/_sim/clock", json={}, user=None)
        live = await sim.ok("GET", "/v2/server-time")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", live)


async def test_one_account_never_sees_or_changes_another_accounts_data() -> None:
    async with running() as sim:
        seeded = await sim.seed(records=5, preferences=2)
        email = seeded["emails"][0]
        first_id = seeded["first_contact_id"]
        pref = seeded["preferences"][0]
        for path in (f"/v2/contacts/{email}", f"/v2/contacts/{first_id}",
                     f"/v2/contacts/{email}/preferences", f"/v2/contacts/{email}/subscriptions"):
            answer = await sim.call("GET", path, user=USER_B)
            assert answer.status == 404, path
            assert answer.body == {"message": "Error: ERROR_CONTACT_NOT_FOUND"}
        put = await sim.call("PUT", f"/v2/contacts/{email}/preferences", user=USER_B,
                             json=[{"id": pref, "isPreference": True, "isOptedIn": True}])
        assert put.status == 404
        assert await sim.ok("GET", "/v2/preferences", user=USER_B) == []
        feed = await sim.call("GET", f"/v2/contacts/with-preference/{pref}/opt-ins-since/2000-01-01",
                              user=USER_B)
        assert feed.status == 404 and "ERROR_PREFERENCE_NOT_FOUND" in feed.body["message"]
        v3 = await sim.call("GET", f"/contacts/v3/email/{email}", user=USER_B)
        assert v3.status == 404 and v3.body["errorCode"] == "contacts:contactNotFound"
        by_id = await sim.call("GET", f"/contacts/v3/contactId/{first_id}", user=USER_B)
        assert by_id.status == 404
        listing = await sim.ok("GET", "/contacts/v3", user=USER_B)
        assert listing["_items"] == []
        started = await sim.ok("PUT", "/contacts/v3/import", expect=202, json={"contacts": [
            {"matchIdentifier": "email", "identifiers": {"email": "x@y.io"}}]})
        other = await sim.call("GET", f"/contacts/v3/import/{started['importId']}", user=USER_B)
        assert other.status == 404 and other.body["errorCode"] == "contacts:importNotFound"
        # The second API user of the same account does see it all.
        assert (await sim.ok("GET", f"/v2/contacts/{email}", user=USER_A2))["email"] == email


async def test_account_strings_are_checked_and_a_demo_account_is_generated() -> None:
    for bad in ("101:user@x.com:short1", "101:user@x.com:longbutnodigits", "abc:user@x.com:pw-12345",
                "101:user@x.com", "101::pass-word-1"):
        with pytest.raises(AccountError) as caught:
            DotdigitalSimulator(accounts=[bad])
        assert "pass-word-1" not in str(caught.value)
    demo = DotdigitalSimulator()
    assert demo.demo_account is not None
    account_id, username, password = demo.demo_account
    assert account_id.isdigit() and "@" in username and len(password) >= 8


async def test_per_account_rate_limit_answers_429_with_headers() -> None:
    async with running(calls_per_minute=3) as sim:
        first = await sim.call("GET", "/v2/server-time")
        assert first.status == 200
        assert first.headers["X-RateLimit-Limit"] == "3"
        assert first.headers["X-RateLimit-Remaining"] == "2"
        assert 1 <= int(first.headers["X-RateLimit-Reset"]) <= 60
        assert first.headers["X-RateLimit-Scope"]
        await sim.ok("GET", "/v2/server-time", user=USER_A2)  # same account, shared budget
        await sim.ok("GET", "/contacts/v3")
        refused = await sim.call("GET", "/v2/server-time")
        assert refused.status == 429
        assert refused.headers["X-RateLimit-Remaining"] == "0"
        assert 1 <= int(refused.headers["X-RateLimit-Reset"]) <= 60
        # only the X-RateLimit-* headers are documented: no friendlier Retry-After
        assert "Retry-After" not in refused.headers
        assert "message" in refused.body
        refused_v3 = await sim.call("GET", "/contacts/v3")
        assert refused_v3.status == 429 and refused_v3.body["errorCode"]
        # Another account has its own budget.
        assert (await sim.call("GET", "/v2/server-time", user=USER_B)).status == 200
        # The limit can be changed (or lifted) at run time.
        assert (await sim.ok("PUT", "/_sim/limits", json={"calls_per_minute": None},
                             user=None))["calls_per_minute"] is None
        lifted = await sim.call("GET", "/v2/server-time")
        assert lifted.status == 200 and "X-RateLimit-Limit" not in lifted.headers
        await sim.ok("PUT", "/_sim/limits", json={"calls_per_minute": 1}, user=None)
        assert (await sim.call("GET", "/v2/server-time")).status == 200
        assert (await sim.call("GET", "/v2/server-time")).status == 429
        bad = await sim.call("PUT", "/_sim/limits", json={"calls_per_minute": 0}, user=None)
        assert bad.status == 400


async def test_unknown_routes_and_injected_faults_use_the_vendor_shapes() -> None:
    async with running() as sim:
        missing = await sim.call("GET", "/v2/no-such-thing")
        assert missing.status == 404 and "No HTTP resource" in missing.body["message"]
        wrong_method = await sim.call("DELETE", "/v2/server-time")
        assert wrong_method.status == 405 and "message" in wrong_method.body
        await sim.ok("PUT", "/_sim/faults", user=None, json={
            "error_rate": {"* /v2/server-time": 1.0, "* /contacts/v3": 1.0}})
        v2 = await sim.call("GET", "/v2/server-time")
        assert v2.status == 500 and "message" in v2.body
        v3 = await sim.call("GET", "/contacts/v3")
        assert v3.status == 500 and "errorCode" in v3.body
        await sim.ok("PUT", "/_sim/faults", user=None, json={"throttle": {"limit": 1}})
        assert (await sim.call("GET", "/v2/account-info")).status == 200
        shared = await sim.call("GET", "/v2/account-info", user=USER_B)  # global, not per account
        assert shared.status == 429 and "X-RateLimit-Reset" in shared.headers
        assert "message" in shared.body



async def test_a_lost_answer_drops_the_connection_after_the_request_is_applied() -> None:
    async with running() as sim:
        await sim.ok("PUT", "/_sim/faults", user=None,
                     json={"lost_answers": {"POST /v2/preferences": 1}})
        with pytest.raises(aiohttp.ClientError):  # a create is not sent again by aiohttp
            await sim.call("POST", "/v2/preferences", json={
                "publicName": "Lost", "privateName": "lost", "isPreference": True})
        # applied all the same; one answer lost, then as usual
        tree = await sim.ok("GET", "/v2/preferences")
        assert [p["publicName"] for p in tree] == ["Lost"]
        await sim.ok("POST", "/v2/preferences", json={
            "publicName": "Kept", "privateName": "kept", "isPreference": True})
