"""The ``/_sim/`` surface: seeding, clock ties, edit helper, reset, stats, state file."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest

from services.simulators import seeding
from tests.simulators.test_dotdigital_support import USER_B, running

pytestmark = pytest.mark.anyio


async def test_seed_follows_the_shared_sample_data_and_is_deterministic() -> None:
    answers, feeds = [], []
    for _ in range(2):
        async with running() as sim:
            answer = await sim.seed(records=40, preferences=5, seed=9)
            answers.append(answer)
            feeds.append([await sim.ok("GET", f"/v2/contacts/with-preference/{p}/opt-ins-since/"
                                              "2000-01-01") for p in answer["preferences"]])
            tree = await sim.ok("GET", "/v2/preferences")
    expected = seeding.preference_tree(5, 9)
    assert answers[0]["preferences"] == [n.id for n in expected if n.is_preference]
    assert answers[0]["categories"] == [n.id for n in expected if not n.is_preference]
    assert [n["id"] for n in tree] == [n.id for n in expected if n.category_id == 0]
    people = seeding.people(40, 9)
    assert answers[0]["emails"] == [p.email for p in people[:5]]
    assert answers[0]["first_contact_id"] == 1 and answers[0]["contacts"] == 40
    assert answers[0] | {"emails": None} == answers[1] | {"emails": None}
    strip = [[[r["contact"]["id"], r["marketingPreferenceOptIns"][0]["isOptedIn"]] for r in feed]
             for feed in feeds[0]]
    assert strip == [[[r["contact"]["id"], r["marketingPreferenceOptIns"][0]["isOptedIn"]]
                      for r in feed] for feed in feeds[1]]
    by_id = {i + 1: p.email for i, p in enumerate(people)}
    for pref, feed in zip(answers[0]["preferences"], feeds[0], strict=True):
        for row in feed:
            state = seeding.initial_state(9, "dotdigital", by_id[row["contact"]["id"]], pref)
            assert row["marketingPreferenceOptIns"][0]["isOptedIn"] is state
        stated = sum(seeding.initial_state(9, "dotdigital", p.email, pref) is not None
                     for p in people)
        assert len(feed) == stated


async def test_seed_targets_one_account_and_rejects_bad_requests() -> None:
    async with running() as sim:
        await sim.seed(records=5, preferences=1)
        other = await sim.seed(records=3, preferences=2, account=202)
        assert other["account"] == 202 and other["first_contact_id"] > 5
        assert len((await sim.ok("GET", "/contacts/v3", user=USER_B))["_items"]) == 3
        assert len((await sim.ok("GET", "/contacts/v3"))["_items"]) == 5
        for body in ({"account": 999}, {"records": -1}, {"records": "many"}):
            assert (await sim.call("POST", "/_sim/seed", json=body, user=None)).status == 400
        accounts = await sim.ok("GET", "/_sim/dotdigital/accounts", user=None)
        assert [(a["id"], a["contacts"]) for a in accounts] == [(101, 5), (202, 3)]
        assert all("pass" not in str(a) for a in accounts)


async def test_a_frozen_clock_gives_ties_and_feeds_include_the_watermark() -> None:
    async with running() as sim:
        seeded = await sim.seed(records=4, preferences=1)
        pref = seeded["preferences"][0]
        await sim.freeze("2032-02-02T02:02:02.222Z")
        watermark = await sim.ok("GET", "/v2/server-time")
        for email in seeded["emails"][:3]:
            await sim.ok("PUT", f"/v2/contacts/{email}/preferences",
                         json=[{"id": pref, "isPreference": True, "isOptedIn": False}])
        await sim.ok("POST", "/v2/contacts/unsubscribe", json={"email": seeded["emails"][3]})
        rows = await sim.ok("GET", f"/v2/contacts/with-preference/{pref}/opt-ins-since/{watermark}")
        assert len(rows) == 3
        assert {r["marketingPreferenceOptIns"][0]["dateModifed"] for r in rows} == {watermark}
        removed = await sim.ok("GET", f"/v2/contacts/suppressed-since/{watermark}")
        assert [r["dateRemoved"] for r in removed] == [watermark]
        modified = await sim.ok("GET", f"/contacts/v3?~modified=gte::{watermark}")
        assert len(modified["_items"]) == 4
        clock = await sim.ok("GET", "/_sim/clock", user=None)
        assert clock["frozen"] is True


async def test_edit_helper_acts_as_the_contact() -> None:
    async with running() as sim:
        seeded = await sim.seed(records=2, preferences=2)
        email = seeded["emails"][0]
        p1, p2 = seeded["preferences"]
        await sim.edit(email, status="Unsubscribed")
        answer = await sim.edit(email, preferences={str(p1): True, str(p2): False})
        states = {o["marketingPreferenceId"]: o["isOptedIn"]
                  for o in answer["marketingPreferenceOptIns"]}
        assert states == {p1: True, p2: False} and answer["contact"]["status"] == "Unsubscribed"
        for body in ({"email": "nobody@example.com"}, {"email": email, "status": "Sleepy"},
                     {"email": email, "preferences": {"777": True}},
                     {"email": email, "preferences": {str(p1): "yes"}},
                     {"email": email, "account": 5}):
            assert (await sim.call("POST", "/_sim/dotdigital/edit", json=body,
                                   user=None)).status == 400


async def test_a_seed_can_be_an_account_whose_opt_ins_were_stamped_long_ago() -> None:
    async with running() as sim:
        now = await sim.ok("GET", "/v2/server-time")
        seeded = await sim.ok("POST", "/_sim/seed", user=None, json={
            "records": 6, "preferences": 1, "seed": 3, "states": "all", "created_s_ago": 3600})
        pref = seeded["preferences"][0]
        assert await sim.ok("GET", f"/v2/contacts/with-preference/{pref}/opt-ins-since/{now}") \
            == []
        hour_ago = (datetime.fromisoformat(now.replace("Z", "+00:00"))
                    - timedelta(hours=1, seconds=1)).isoformat().replace("+00:00", "Z")
        rows = await sim.ok("GET", f"/v2/contacts/with-preference/{pref}/opt-ins-since/{hour_ago}")
        assert len(rows) == 6
        for bad in (-1, "soon", 1e12, True):
            answer = await sim.call("POST", "/_sim/seed", user=None,
                                    json={"records": 2, "created_s_ago": bad})
            assert answer.status == 400, bad
            assert "created_s_ago" in answer.text


async def test_edits_apply_in_order_and_a_refused_one_stops_no_other() -> None:
    async with running() as sim:
        seeded = await sim.seed(records=2, preferences=2)
        first, second = seeded["emails"]
        p1, p2 = seeded["preferences"]
        answer = await sim.ok("POST", "/_sim/dotdigital/edits", user=None, json={"edits": [
            {"email": first, "preferences": {str(p1): True}},
            {"email": "nobody@example.com", "preferences": {str(p1): True}},
            {"email": first, "preferences": {str(p1): False, str(p2): True}},
            {"email": second, "preferences": {"777": True}},
            {"email": second, "status": "Unsubscribed", "preferences": {str(p2): False}}]})
        results = answer["results"]
        assert [("error" in r) for r in results] == [False, True, False, True, False]
        assert "nobody@example.com" in results[1]["error"]
        # the later edit of the same contact won, as a later request would have
        states = {o["marketingPreferenceId"]: o["isOptedIn"]
                  for o in (await sim.edit(first))["marketingPreferenceOptIns"]}
        assert states[p1] is False and states[p2] is True
        other = await sim.edit(second)
        assert other["contact"]["status"] == "Unsubscribed"
        assert {o["marketingPreferenceId"]: o["isOptedIn"]
                for o in other["marketingPreferenceOptIns"]}[p2] is False
        for body in ({}, {"edits": {"email": first}}):
            assert (await sim.call("POST", "/_sim/dotdigital/edits", json=body,
                                   user=None)).status == 400


async def test_reset_and_stats() -> None:
    async with running() as sim:
        await sim.seed(records=3, preferences=1)
        await sim.ok("GET", "/v2/preferences")
        await sim.ok("PUT", "/v2/contacts/x@example.com/preferences", expect=404, json=[])
        await sim.ok("POST", "/v2/contacts", expect=201, json={"email": "w@example.com"})
        stats = await sim.ok("GET", "/_sim/stats", user=None)
        assert stats["calls"]["GET /v2/preferences"] == 1
        assert stats["statuses"]["404"] == 1 and stats["writes_applied"] == 1
        await sim.ok("POST", "/_sim/reset", user=None)
        assert await sim.ok("GET", "/v2/preferences") == []
        assert (await sim.ok("GET", "/_sim/stats", user=None))["total_calls"] == 1


async def test_state_file_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "dotdigital.json"
    async with running(state_file=state) as sim:
        seeded = await sim.seed(records=20, preferences=3)
        pref = seeded["preferences"][2]
        email = seeded["emails"][4]
        await sim.ok("PUT", f"/v2/contacts/{email}/preferences",
                     json=[{"id": pref, "isPreference": True, "isOptedIn": True}])
        await sim.ok("POST", "/v2/contacts/unsubscribe", json={"email": seeded["emails"][3]})
        await sim.ok("POST", "/v2/preferences", json={"publicName": "Late", "privateName": "l",
                                                      "isPreference": True})
        saved = await sim.ok("POST", "/_sim/save", user=None)
        assert saved["saved"] == str(state)
        subs = await sim.ok("GET", f"/v2/contacts/{email}/subscriptions")
        tree = await sim.ok("GET", "/v2/preferences")
        suppressed = await sim.ok("GET", "/v2/contacts/suppressed-since/2000-01-01")
        await sim.ok("PATCH", "/contacts/v3/email/after@example.com", expect=201, json={})
    async with running(state_file=state) as again:
        assert await again.ok("GET", f"/v2/contacts/{email}/subscriptions") == subs
        assert await again.ok("GET", "/v2/preferences") == tree
        assert await again.ok("GET", "/v2/contacts/suppressed-since/2000-01-01") == suppressed
        # Saved on shutdown too.
        assert (await again.ok("GET", "/contacts/v3/email/after@example.com"))["contactId"] == 21
        created = await again.ok("POST", "/v2/preferences", json={
            "publicName": "Next", "privateName": "n", "isPreference": True})
        assert created["id"] > max(n["id"] for n in tree)
    async with running() as plain:
        assert (await plain.call("POST", "/_sim/save", user=None)).status == 400
