"""Dataverse simulator: the ``listmember`` intersect table (``GET /listmembers``) and what it
refuses: the messages it lacks and change tracking."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import orjson
import pytest

from tests.simulators.test_dynamics_support import Org, organisation

pytestmark = pytest.mark.anyio

SELECT = "$select=_listid_value,_entityid_value,entitytype,createdon"


async def _member_rows(org: Org, query: str) -> list[dict[str, object]]:
    answer = await org.get(f"listmembers?{SELECT}&{query}")
    assert answer.status == 200, answer.text
    rows: list[dict[str, object]] = answer.json["value"]
    return rows


async def test_each_membership_is_a_listmember_row_with_its_creation_time() -> None:
    async with organisation() as org:
        made = await org.seed(records=10)
        contacts = made["lists"]["contact"]
        seeded = await _member_rows(org, f"$filter=_listid_value eq {contacts}")
        assert len(seeded) == made["contacts"]
        assert {r["entitytype"] for r in seeded} == {"contact"}
        stamp = str(seeded[0]["createdon"])

        await org.sim("PUT", "clock", {"offset_s": 60})
        person = await org.create("contacts", {"lastname": "Late", "emailaddress1": "l@x.org"})
        answer = await org.call("POST", f"lists({contacts})/Microsoft.Dynamics.CRM.AddMemberList",
                                json={"EntityId": person["contactid"]})
        assert answer.status == 200
        added = await _member_rows(org, f"$filter=createdon gt {stamp}")
        assert [(r["_entityid_value"], r["_listid_value"], r["listmemberid"]) for r in added] \
            == [(person["contactid"], contacts, answer.json["Id"])]

        # removed with its membership, as is a deleted record's
        await org.call("POST", f"lists({contacts})/Microsoft.Dynamics.CRM.RemoveMemberList",
                       json={"EntityId": person["contactid"]})
        assert await _member_rows(org, f"$filter=createdon gt {stamp}") == []
        gone = str(seeded[0]["_entityid_value"])
        await org.call("DELETE", f"contacts({gone})")
        left = await _member_rows(org, f"$filter=_listid_value eq {contacts}")
        assert gone not in {r["_entityid_value"] for r in left}
        assert len(left) == made["contacts"] - 1


async def test_a_seed_can_be_an_account_whose_lists_were_filled_long_ago() -> None:
    async with organisation() as org:
        answer = await org.sim("POST", "seed", {"records": 4, "preferences": 2, "seed": 7,
                                                "created_s_ago": 3600})
        assert answer.status == 200, answer.text
        now = await org.get("contacts?$select=createdon,modifiedon")
        stamps = now.json["value"][0]
        created, modified = (datetime.fromisoformat(str(stamps[c]).replace("Z", "+00:00"))
                             for c in ("createdon", "modifiedon"))
        assert modified - created == timedelta(hours=1)
        since = (created + timedelta(seconds=1)).isoformat().replace("+00:00", "Z")
        assert await _member_rows(org, f"$filter=createdon ge {since}") == []
        assert len(await _member_rows(org, "$filter=createdon ge "
                                      + created.isoformat().replace("+00:00", "Z"))) == 4
        for bad in (-1, "soon", 1e12):
            answer = await org.sim("POST", "seed", {"records": 4, "created_s_ago": bad})
            assert answer.status == 400, bad
            assert "created_s_ago" in answer.text


async def test_listmembers_refuse_change_tracking_and_the_messages_they_lack() -> None:
    async with organisation() as org:
        await org.seed(records=3)
        answer = await org.get(f"listmembers?{SELECT}",
                               headers={"Prefer": "odata.track-changes"})
        assert answer.status == 400
        assert answer.error == {"code": "0x80072491", "message": "Entity listmember isn't "
                                "enabled for change tracking."}
        row = (await _member_rows(org, "$top=1"))[0]
        for method, message in (("GET", "Retrieve"), ("PATCH", "Update"), ("DELETE", "Delete")):
            answer = await org.call(method, f"listmembers({row['listmemberid']})",
                                    json={"entitytype": "lead"} if method == "PATCH" else None)
            assert answer.status == 400, (method, answer.text)
            assert answer.error["message"] == (f"The '{message}' method does not support "
                                               "entities of type 'listmember'.")
        answer = await org.call("POST", "listmembers", json={"entitytype": "contact"})
        assert answer.status == 400


async def test_a_state_saved_without_listmember_rows_gets_one_per_membership(
        tmp_path: Path) -> None:
    state = tmp_path / "dynamics.json"
    async with organisation(state_file=state) as org:
        made = await org.seed(records=8)
        assert (await org.sim("POST", "save")).status == 200
    saved = orjson.loads(state.read_bytes())
    del saved["tables"]["listmembers"]  # as kept before the table was simulated
    state.write_bytes(orjson.dumps(saved))
    async with organisation(state_file=state) as again:
        rows = await _member_rows(again, "$count=true")
        assert len(rows) == made["contacts"] + made["leads"]
