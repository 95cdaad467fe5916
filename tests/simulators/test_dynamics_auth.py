"""Dataverse simulator: client-credentials tokens, Bearer checks, service document, metadata."""

from __future__ import annotations

import aiohttp
import pytest

from tests.simulators.test_dynamics_support import CLIENT_ID, SECRET, TENANT, organisation

pytestmark = pytest.mark.anyio


async def test_token_from_form_body_has_the_documented_fields() -> None:
    async with organisation(login=False) as org:
        answer = await org.get_token()
        assert answer.status == 200
        body = answer.json
        assert body["token_type"] == "Bearer"
        assert body["expires_in"] == 3599
        assert body["access_token"]


async def test_token_with_credentials_in_http_basic() -> None:
    async with organisation(login=False) as org:
        answer = await org.raw(
            "POST", f"{org.url}/{TENANT}/oauth2/v2.0/token",
            data={"grant_type": "client_credentials", "scope": f"{org.url}/.default"},
            headers={"Authorization": aiohttp.encode_basic_auth(CLIENT_ID, SECRET)})
        assert answer.status == 200, answer.text


@pytest.mark.parametrize(("form", "status", "error", "code"), [
    ({"client_secret": "wrong"}, 401, "invalid_client", 7000215),
    ({"scope": "https://other.crm.dynamics.com/.default"}, 400, "invalid_scope", 70011),
    ({"client_id": "nobody"}, 400, "unauthorized_client", 700016),
    ({"grant_type": "password"}, 400, "unsupported_grant_type", 70003),
])
async def test_token_errors_have_the_identity_platform_shape(
        form: dict[str, str], status: int, error: str, code: int) -> None:
    async with organisation(login=False) as org:
        answer = await org.get_token(**form)
        assert answer.status == status
        body = answer.json
        assert body["error"] == error
        assert body["error_codes"] == [code]
        assert body["error_description"].startswith(f"AADSTS{code}:")
        assert {"timestamp", "trace_id", "correlation_id"} <= set(body)
        assert SECRET not in answer.text


async def test_scope_must_name_the_simulator_itself() -> None:
    async with organisation(login=False) as org:
        assert (await org.get_token(scope=f"{org.url}/.default")).status == 200
        assert (await org.get_token(scope=f"{org.url}/user_impersonation")).status == 400


async def test_api_without_a_token_is_401_with_a_bearer_challenge() -> None:
    async with organisation(login=False) as org:
        answer = await org.raw("GET", f"{org.api}/contacts")
        assert answer.status == 401
        assert answer.headers["WWW-Authenticate"].startswith("Bearer authorization_uri=")
        assert "error" in answer.json
        bogus = await org.raw("GET", f"{org.api}/contacts",
                              headers={"Authorization": "Bearer not-a-token"})
        assert bogus.status == 401


async def test_tokens_expire_on_the_simulator_clock() -> None:
    async with organisation(token_lifetime_s=60) as org:
        assert (await org.get("contacts")).status == 200
        await org.sim("PUT", "clock", {"offset_s": 61})
        expired = await org.get("contacts")
        assert expired.status == 401
        assert expired.error["code"] == "0x8005F101"
        await org.login()
        assert (await org.get("contacts")).status == 200


async def test_service_document_and_older_versions() -> None:
    async with organisation() as org:
        answer = await org.get("")
        assert answer.status == 200
        assert answer.headers["OData-Version"] == "4.0"
        names = {v["name"] for v in answer.json["value"]}
        assert {"contacts", "leads", "accounts", "lists", "psync_marketingpreferences",
                "psync_marketingpreferencesubscriptions"} <= names
        for version in ("v9.0", "v9.1"):
            old = await org.get(f"{org.url}/api/data/{version}/contacts")
            assert old.status == 200
            assert f"/api/data/{version}/$metadata#contacts" in old.json["@odata.context"]


async def test_entity_definitions_lookups_real_clients_make() -> None:
    async with organisation() as org:
        tracked = await org.get(
            "EntityDefinitions?$select=SchemaName,LogicalName&$filter=ChangeTrackingEnabled eq true")
        assert tracked.status == 200
        logical = {v["LogicalName"] for v in tracked.json["value"]}
        assert logical == {"contact", "lead", "account", "list", "psync_marketingpreference",
                           "psync_marketingpreferencesubscription"}
        one = await org.get("EntityDefinitions?$select=LogicalName,EntitySetName,"
                            "PrimaryIdAttribute&$filter=LogicalName eq 'contact'")
        assert [(v["EntitySetName"], v["PrimaryIdAttribute"]) for v in one.json["value"]] == [
            ("contacts", "contactid")]
        by_key = await org.get("EntityDefinitions(LogicalName='lead')?$select=EntitySetName")
        assert by_key.json["EntitySetName"] == "leads"
        picklists = await org.get(
            "EntityDefinitions(LogicalName='psync_marketingpreferencesubscription')/Attributes/"
            "Microsoft.Dynamics.CRM.PicklistAttributeMetadata?$select=LogicalName"
            "&$expand=OptionSet($select=Options)")
        options = {v["LogicalName"]: v["OptionSet"]["Options"] for v in picklists.json["value"]}
        assert [o["Value"] for o in options["psync_status"]] == [100000000, 100000001]
        metadata = await org.get("$metadata")
        assert "Org.OData.Capabilities.V1.ChangeTracking" in metadata.text
