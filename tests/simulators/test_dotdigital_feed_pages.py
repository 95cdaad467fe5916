"""dotdigital simulator: feed pages are built straight from a preference's states.

``opt_in_changes_body`` renders a page without an ``OptInRecord`` per contact, formats each
stamp once and keeps each contact's part rendered while what it shows stands. Its answers must
be the bytes the general renderers give (``api_contact`` and ``api_opt_in`` over
``AccountStore.opt_ins``, as the subscriptions call answers), found by a plain scan of the
contacts: for every preference, date and ``minContactId``, before and after writes that vary
each rendered field (stamps, opt-outs, statuses, lists, email, types). The
``with-preference`` pages (the same slot walk, on the opt-in states) must list the opted-in
contacts a plain scan finds.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from services.simulators.dotdigital.dates import parse_path_date
from services.simulators.dotdigital.store import AccountStore
from services.simulators.dotdigital.v2 import PAGE_LIMIT, api_contact, api_opt_in
from tests.simulators.test_dotdigital_support import Sim, running

pytestmark = pytest.mark.anyio

T1 = "2030-01-01T00:00:00.000Z"
T2 = "2030-01-01T00:00:05.250Z"


def _plain_page(store: AccountStore, preference_id: int, since: str, min_id: int) -> bytes:
    since_ms = parse_path_date(since)
    assert since_ms is not None
    rows: list[dict[str, Any]] = []
    for contact in store.contacts:
        if contact.id < min_id or len(rows) == PAGE_LIMIT:
            continue
        rows.extend({"contact": api_contact(contact),
                     "marketingPreferenceOptIns": [api_opt_in(store, record)]}
                    for record in store.opt_ins(contact)
                    if record.preference_id == preference_id
                    and record.modified_ms >= max(since_ms, 0))
    return orjson.dumps(rows)


def _plain_opted_in(store: AccountStore, preference_id: int, min_id: int) -> bytes:
    return orjson.dumps([{"id": c.id, "email": c.email} for c in store.contacts
                         if c.id >= min_id and store.opt_in_state(c, preference_id)
                         ][:PAGE_LIMIT])


async def _vary(sim: Sim, prefs: list[int], emails: list[str]) -> None:
    """Writes at two frozen times that change every field a feed row shows."""
    await sim.freeze(T1)
    for n, email in enumerate(emails[10:1600:7]):
        await sim.ok("PUT", f"/v2/contacts/{email}/preferences", json=[
            {"id": pref, "isPreference": True, "isOptedIn": (n + i) % 2 == 0}
            for i, pref in enumerate(prefs)])
    book = await sim.ok("POST", "/v2/address-books", json={"name": "Second list"})
    await sim.ok("PATCH", f"/contacts/v3/email/{emails[12]}", json={
        "lists": [book["id"]], "channelProperties": {"email": {
            "optInType": "double", "emailType": "plainText"}}})
    await sim.freeze(T2)
    await sim.ok("PATCH", f"/contacts/v3/email/{emails[17]}", json={
        "identifiers": {"email": "Renamed.Contact@Example.com"},
        "preferences": [{"id": prefs[0], "isOptedIn": False}]})
    await sim.ok("POST", "/v2/contacts/unsubscribe", json={"email": emails[24]})
    await sim.ok("PUT", "/contacts/v3/import", json={"contacts": [
        {"matchIdentifier": "email", "identifiers": {"email": f"new{n}@example.org"},
         "preferences": [{"id": pref, "isOptedIn": n % 2 == 0} for pref in prefs]}
        for n in range(40)]}, expect=202)
    await sim.ok("POST", "/_sim/dotdigital/imports/run", user=None)


async def test_opt_in_pages_are_the_general_renderers_bytes() -> None:
    async with running() as sim:
        seeded = await sim.seed(records=2500, preferences=3, seed=5)
        prefs = [int(p) for p in seeded["preferences"]]
        store = sim.simulator.backend.stores[101]
        first = store.first_contact_id
        # read once before the writes: every contact's part is then kept rendered
        for pref in prefs:
            for min_id in (0, first + 1000, first + 2000):
                answer = await sim.call(
                    "GET", f"/v2/contacts/with-preference/{pref}/opt-ins-since/2000-01-01"
                           f"?minContactId={min_id}")
                assert answer.text.encode() == _plain_page(store, pref, "2000-01-01", min_id)
        await _vary(sim, prefs, [c.email for c in store.contacts])
        pages = 0
        for pref in prefs:
            for since in ("2000-01-01", T1, "2030-01-01T00:00:00.001Z", T2, "2031-01-01"):
                for min_id in (0, first + 17, first + 1234, first + 2480, first + 9000):
                    answer = await sim.call(
                        "GET", f"/v2/contacts/with-preference/{pref}/opt-ins-since/{since}"
                               f"?minContactId={min_id}")
                    assert answer.status == 200
                    assert answer.text.encode() == _plain_page(store, pref, since, min_id), (
                        pref, since, min_id)
                    pages += bool(answer.body)
            for min_id in (0, first + 17, first + 1234, first + 2480, first + 9000):
                answer = await sim.call(
                    "GET", f"/v2/contacts/with-preference/{pref}?minContactId={min_id}")
                assert answer.status == 200
                assert answer.text.encode() == _plain_opted_in(store, pref, min_id), (
                    pref, min_id)
        assert pages > 30
