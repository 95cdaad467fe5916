"""The simulators' write journals (``/_sim/journal``), which the chaos checker counts writes per
key with and tells users' changes from prefsync's by."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from common.vendors.base import TransportError
from common.vendors.dataverse.client import DataverseClient
from common.vendors.dataverse.schema import OPTED_IN, SUBSCRIPTIONS
from common.vendors.dotdigital.client import DotdigitalClient
from common.vendors.dotdigital.models import ImportContact
from tests.harness.waiting import until

from ..pipeline.conftest import World, make_world

pytestmark = [pytest.mark.chaos, pytest.mark.anyio]


async def journal(world: World, url: str) -> list[dict[str, Any]]:
    async with world.http.get(f"{url}/_sim/journal") as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
    assert body["enabled"]
    entries: list[dict[str, Any]] = body["entries"]
    return entries


async def test_journals_tell_users_edits_from_api_writes(tmp_path: Path) -> None:
    async with make_world(tmp_path, records=4, preferences=2) as world:
        async with world.http.get(f"{world.dd_url}/_sim/journal") as response:
            assert (await response.json()) == {"enabled": False, "entries": []}
        for url in (world.dyn_url, world.dd_url):
            async with world.http.put(f"{url}/_sim/journal", json={"enabled": True}) as response:
                assert response.status == 200
        email = world.people[0].email
        preference = world.preferences[0].id
        account = world.config.account(world.account)

        answer = await world.edit_dynamics(email, preference, False)
        await world.edit_dotdigital(email, preference, False)
        async with DataverseClient(config=account.dynamics) as dataverse:
            await dataverse.update(SUBSCRIPTIONS, answer["id"], {"psync_status": OPTED_IN})
        async with DotdigitalClient(config=account.dotdigital) as dotdigital:
            await dotdigital.update_contact_preferences(email, {preference: True})

        dynamics = await journal(world, world.dyn_url)
        assert [(e["via"], e["opted_in"]) for e in dynamics] == [("sim", False), ("api", True)]
        assert {e["email"] for e in dynamics} == {email}
        assert {(e["preference_id"], e["record_id"], e["account"]) for e in dynamics} == {
            (preference, answer["record_id"], world.account)}
        # the edit's answer carries the row's stamp and version, as the journal has them
        assert (dynamics[0]["at"], dynamics[0]["version"]) == (answer["modifiedon"],
                                                               answer["versionnumber"])
        assert dynamics[1]["version"] > dynamics[0]["version"]
        dotdigital_entries = await journal(world, world.dd_url)
        assert [(e["via"], e["opted_in"], e["preference_id"], e["email"])
                for e in dotdigital_entries] == [("sim", False, preference, email),
                                                 ("api", True, preference, email)]
        assert all(e["at"].endswith("Z") for e in dotdigital_entries)


async def test_a_write_whose_caller_gave_up_is_journaled_unanswered(tmp_path: Path) -> None:
    """A write through the API is journaled ``answered`` when its caller received the answer,
    and not when the caller had given up before it came (a client that timed out while the
    vendor was slow, as under the chaos suite's vendor-latency fault): the write landed all the
    same, and the caller never learnt that it did."""
    async with make_world(tmp_path, records=4, preferences=2) as world:
        await world.call("PUT", f"{world.dd_url}/_sim/journal", {"enabled": True})
        email, other, third = (p.email for p in world.people[:3])
        preference = world.preferences[0].id
        config = world.config.account(world.account).dotdigital
        async with DotdigitalClient(config=config) as dotdigital:
            await dotdigital.update_contact_preferences(email, {preference: True})
        await world.faults("dotdigital", {"latency_ms": {"PUT /v2/contacts": 1500,
                                                         "PUT /contacts/v3/import": 1500}})
        impatient = replace(config, timeout_s=0.5, call_deadline_s=0.6)
        async with DotdigitalClient(config=impatient) as dotdigital:
            with pytest.raises(TransportError):
                await dotdigital.update_contact_preferences(other, {preference: True})
            # an import submitted so is applied after its (lost) answer, on its behalf
            with pytest.raises(TransportError):
                await dotdigital.start_import([ImportContact(email=third,
                                                             preferences={preference: True})])

        async def landed() -> list[dict[str, Any]] | None:
            entries = await journal(world, world.dd_url)
            return entries if {e["email"] for e in entries} >= {other, third} else None

        entries = await until(landed, timeout_s=10, what="the slow writes landing")
        # (the client may have sent the slow PUT again before its deadline: each lands)
        answered: dict[str, set[bool]] = {}
        for entry in entries:
            answered.setdefault(entry["email"], set()).add(entry["answered"])
        assert answered == {email: {True}, other: {False}, third: {False}}
