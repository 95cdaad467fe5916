"""DotdigitalClient against the dotdigital simulator, over real sockets."""

from __future__ import annotations

import asyncio
import base64
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from common.messaging.resilience import dependency_of
from common.vendors.base import (
    AuthenticationError,
    RetryPolicy,
    ThrottledError,
    VendorError,
)
from common.vendors.dotdigital.client import DotdigitalClient, ImportUnfinished, _collector_paused
from common.vendors.dotdigital.models import ImportContact, parse_datetime
from services.simulators.base import serving
from tests.unit.vendors.support import (
    DD_ACCOUNT,
    DD_OTHER_PASSWORD,
    DD_OTHER_USER,
    DD_PASSWORD,
    DD_USER,
    Events,
    SimControl,
    assert_hidden,
    dotdigital_config,
    dotdigital_sim,
    feed_rows,
)

pytestmark = pytest.mark.anyio

QUICK = RetryPolicy(attempts=40, base_delay_s=0.001, max_delay_s=0.01)
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


@asynccontextmanager
async def account(records: int = 10, preferences: int = 4, *, events: Events | None = None,
                  retry: RetryPolicy = QUICK, sim_kwargs: dict[str, Any] | None = None,
                  **config: Any) -> AsyncIterator[tuple[DotdigitalClient, SimControl,
                                                        dict[str, Any]]]:
    async with dotdigital_sim(**(sim_kwargs or {})) as sim:
        seeded = await sim.seed(records=records, preferences=preferences, seed=5,
                                account=DD_ACCOUNT)
        async with DotdigitalClient(config=dotdigital_config(sim.url, **config),
                                    on_request=events, retry=retry) as client:
            yield client, sim, seeded


def leaves(tree: list[dict[str, Any]]) -> dict[int, int]:
    """Preference id -> category id (0 at the top level)."""
    out: dict[int, int] = {}
    for node in tree:
        if node["isPreference"]:
            out[node["id"]] = 0
        for child in node.get("preferences") or []:
            out[child["id"]] = node["id"]
    return out


async def test_account_info_and_server_time() -> None:
    async with account(records=0) as (client, sim, _):
        info = await client.account_info()
        assert str(info.id) == DD_ACCOUNT
        assert info.api_endpoint == sim.url
        await sim.clock(freeze_at="2024-05-01T10:00:00.123Z")
        assert await client.server_time() == datetime(2024, 5, 1, 10, 0, 0, 123_000, tzinfo=UTC)


async def test_preference_definitions_lifecycle() -> None:
    async with account(records=0, preferences=2) as (client, _, _):
        category = await client.create_preference(public_name="Outdoors", is_preference=False)
        tents = await client.create_preference(public_name="Tents", category_id=category["id"])
        assert leaves(await client.preferences())[tents["id"]] == category["id"]
        renamed = await client.update_preference(tents["id"], public_name="Tents & tarps",
                                                 category_id=category["id"])
        assert renamed["publicName"] == "Tents & tarps"
        await client.delete_preference(category["id"])
        assert tents["id"] not in leaves(await client.preferences())


async def test_contact_preferences_update_in_and_out_of_categories() -> None:
    async with account(records=3, preferences=4) as (client, _, seeded):
        email = seeded["emails"][0]
        placed = leaves(await client.preferences())
        in_category = next(p for p, c in placed.items() if c)
        top_level = next(p for p, c in placed.items() if not c)
        before = datetime.now(UTC) - timedelta(seconds=1)
        await client.update_contact_preferences(email, {in_category: True, top_level: False})
        tree = await client.contact_preferences(email)
        states = {child["id"]: child.get("isOptedIn") for node in tree
                  for child in [node, *(node.get("preferences") or [])] if child["isPreference"]}
        assert states[in_category] is True and states[top_level] is False
        subscriptions = await client.subscriptions(email)
        assert subscriptions.contact.email == email
        latest = subscriptions.by_preference()
        assert latest[in_category].is_opted_in and not latest[top_level].is_opted_in
        assert latest[in_category].modified >= before
        assert latest[in_category].modified.tzinfo is not None
        await client.update_contact_preferences(email, {})  # nothing to send, no call


async def test_emails_with_plus_signs_travel_encoded() -> None:
    async with account(records=0, preferences=2) as (client, _, seeded):
        email = "ada+news@example.com"
        [first, *_] = seeded["preferences"]
        created = await client.patch_contact_v3(email, preferences={first: True})
        assert created.email == email and created.preferences.get(first) is True
        contact = await client.contact(email)
        assert contact.email == email
        assert (await client.subscriptions(email)).by_preference()[first].is_opted_in
        assert (await client.get_contact_v3(email)).contact_id == contact.id


async def test_opt_ins_since_pages_past_1000_contacts() -> None:
    events = Events()
    async with account(records=2500, preferences=1, events=events) as (client, _, seeded):
        [preference] = seeded["preferences"]
        assert seeded["states"] > 1000
        pages = [page async for page in client.iter_opt_ins_since(preference, LONG_AGO)]
        assert len(pages) >= 2 and len(pages[0]) == 1000
        ids = [item.contact.id for page in pages for item in page]
        assert ids == sorted(ids) and len(set(ids)) == len(ids) == seeded["states"]
        assert all(r.preference_id == preference for page in pages for item in page
                   for r in item.opt_ins)
        endpoint = "GET /v2/contacts/with-preference/{preferenceId}/opt-ins-since/{date}"
        assert events.statuses(endpoint) == [200] * len(pages)
        resumed = [item.contact.id async for page in client.iter_opt_ins_since(
            preference, LONG_AGO, min_contact_id=ids[1000]) for item in page]
        assert resumed == ids[1000:]
        later = [p async for p in client.iter_opt_ins_since(
            preference, datetime.now(UTC) + timedelta(hours=1))]
        assert later == []
        # only the contacts asked for are built; the paging still goes through every page
        wanted = [pages[0][5], pages[-1][-1]]
        calls = len(events.statuses(endpoint))
        only = [page async for page in client.iter_opt_ins_since(
            preference, LONG_AGO, emails={item.contact.email.lower() for item in wanted})]
        assert only == [[wanted[0]], [wanted[1]]]
        assert len(events.statuses(endpoint)) - calls == len(pages)


async def test_opt_in_entries_are_the_feeds_opt_ins_to_the_preference_alone() -> None:
    events = Events()
    async with account(records=2500, preferences=2, events=events) as (client, _, seeded):
        preference = seeded["preferences"][0]
        endpoint = "GET /v2/contacts/with-preference/{preferenceId}/opt-ins-since/{date}"
        built = [(item.contact.id, item.contact.email.strip().lower(), r.is_opted_in,
                  r.modified)
                 async for page in client.iter_opt_ins_since(preference, LONG_AGO)
                 for item in page for r in item.opt_ins if r.preference_id == preference]
        calls = len(events.statuses(endpoint))

        entries = [entry async for page in client.iter_opt_in_entries(preference, LONG_AGO)
                   for entry in page]

        assert len(built) > 1000 and entries == built
        assert len(events.statuses(endpoint)) == 2 * calls  # the same pages, read again


async def test_feed_contacts_are_the_feeds_contacts_with_their_opt_ins_to_the_preference(
        ) -> None:
    events = Events()
    async with account(records=2500, preferences=2, events=events) as (client, _, seeded):
        preference = seeded["preferences"][0]
        endpoint = "GET /v2/contacts/with-preference/{preferenceId}/opt-ins-since/{date}"
        built = [[(item.contact.id, item.contact.email, item.contact.status,
                   [(r.is_opted_in, r.modified) for r in item.opt_ins
                    if r.preference_id == preference]) for item in page]
                 async for page in client.iter_opt_ins_since(preference, LONG_AGO)]
        calls = len(events.statuses(endpoint))

        pages = [feed_rows(page)
                 async for page in client.iter_feed_contacts(preference, LONG_AGO)]
        resumed = [feed_rows(page) async for page in client.iter_feed_contacts(
            preference, LONG_AGO, min_contact_id=built[1][0][0])]

        assert len(built) >= 2 and pages == built
        assert resumed == built[1:]
        assert gc.isenabled()  # paused only while each page was read
        assert len(events.statuses(endpoint)) == calls + calls + (calls - 1)


def test_the_collector_is_paused_only_while_a_page_is_read() -> None:
    assert gc.isenabled()
    with _collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError), _collector_paused():
        raise ValueError("a malformed page")
    assert gc.isenabled()
    gc.disable()  # paused by someone else: left as it was
    try:
        with _collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


async def test_unsubscribes_show_in_the_suppression_feeds() -> None:
    async with account(records=5) as (client, _, seeded):
        since = await client.server_time()
        gone = seeded["emails"][:2]
        for email in gone:
            removal = await client.unsubscribe(email)
            assert removal.contact.email == email and removal.reason == "Unsubscribed"
        unsubscribed = [s async for page in client.iter_unsubscribed_since(since) for s in page]
        assert sorted(s.contact.email for s in unsubscribed) == sorted(gone)
        assert all(s.removed >= since for s in unsubscribed)
        suppressed = [s async for page in client.iter_suppressed_since(since) for s in page]
        assert {s.contact.email for s in suppressed} >= set(gone)

        challenged = await client.resubscribe(gone[0], challenge=True)
        assert challenged.status == "ContactChallenged"
        added = await client.resubscribe(gone[1], challenge=False)
        assert added.status == "ContactAdded"
        assert added.contact is not None and added.contact.status == "Subscribed"


async def test_v3_contacts_listed_by_marker_pages() -> None:
    async with account(records=7, preferences=2) as (client, _, _):
        pages = [page async for page in client.iter_contacts_v3(modified_since=LONG_AGO,
                                                                limit=3)]
        assert [len(p) for p in pages] == [3, 3, 1]
        contacts = [c for p in pages for c in p]
        assert len({c.contact_id for c in contacts}) == 7
        assert all(c.updated is not None and c.updated.tzinfo is not None for c in contacts)


async def test_v3_contact_statuses_are_the_contacts_fields_unparsed() -> None:
    """What a resubscription check reads of each contact: the id, email and status
    :func:`parse_contact_v3` reads, and ``updated`` as answered (it parses to the same time)."""
    async with account(records=7, preferences=2) as (client, _, _):
        contacts = [c async for p in client.iter_contacts_v3(modified_since=LONG_AGO, include=(),
                                                             limit=3) for c in p]
        pages = [p async for p in client.iter_contact_statuses(modified_since=LONG_AGO, limit=3)]
        assert [len(p) for p in pages] == [3, 3, 1]
        statuses = [s for p in pages for s in p]
        assert [(i, e, st) for i, e, st, _ in statuses] == [
            (c.contact_id, c.email, c.status) for c in contacts]
        assert [parse_datetime(u) for *_, u in statuses] == [c.updated for c in contacts]


async def test_import_lifecycle_reports_results_and_failures() -> None:
    async with account(records=2, preferences=2, sim_kwargs={"import_delay_s": 0.2}) as (
            client, _, seeded):
        first, second = seeded["preferences"][:2]
        submitted = time.monotonic()
        import_id = await client.start_import([
            ImportContact(email=seeded["emails"][0], preferences={first: False}),
            ImportContact(email="brand.new@example.com", preferences={first: True, second: True},
                          data_fields={"firstName": "Brand"}),
            ImportContact(email="not an email", preferences={first: True}),
        ])
        report = await client.import_report(import_id, started=submitted, first_poll_s=0.05)
        assert report.succeeded
        assert report.summary["newContacts"] == 1 and report.summary["updatedContacts"] == 1
        assert [f.codes for f in report.failures] == [("invalidEmail",)]
        fresh = await client.get_contact_v3("brand.new@example.com")
        assert fresh.preferences == {first: True, second: True}
        assert (await client.subscriptions(seeded["emails"][0])).by_preference()[first]\
            .is_opted_in is False


async def test_unknown_import_is_the_v3_not_found_error() -> None:
    async with account(records=0) as (client, _, _):
        with pytest.raises(VendorError) as caught:
            await client.import_status("00000000-0000-0000-0000-000000000000")
        assert (caught.value.status, caught.value.code) == (404, "contacts:importNotFound")


async def test_too_many_active_imports_waits_for_a_free_slot() -> None:
    events = Events()
    async with account(records=0, events=events, sim_kwargs={"import_delay_s": 0.3}) as (
            client, _, _):
        people = [ImportContact(email=f"p{i}@example.com") for i in range(26)]
        ids = [await client.start_import([person]) for person in people]
        assert len(set(ids)) == 26
        assert 429 in events.statuses("PUT /contacts/v3/import")


async def test_bad_requests_surface_the_vendor_codes() -> None:
    async with account(records=1, preferences=2) as (client, _, seeded):
        with pytest.raises(VendorError) as v2:
            await client.contact("nobody@example.com")
        assert (v2.value.status, v2.value.code) == (404, "ERROR_CONTACT_NOT_FOUND")
        with pytest.raises(VendorError) as pref:
            await client.update_contact_preferences(seeded["emails"][0], {999_999: True})
        assert pref.value.code == "ERROR_PREFERENCE_NOT_FOUND"
        with pytest.raises(VendorError) as v3:
            await client.get_contact_v3("nobody@example.com")
        assert (v3.value.status, v3.value.code) == (404, "contacts:contactNotFound")
        assert "nobody@example.com" not in v3.value.message  # details' items are not copied


async def test_another_accounts_data_is_not_visible() -> None:
    async with account(records=3) as (client, sim, seeded):
        mine = seeded["emails"][0]
        import_id = await client.start_import([ImportContact(email="mine@example.com")])
        async with DotdigitalClient(config=dotdigital_config(
                sim.url, user=DD_OTHER_USER, password=DD_OTHER_PASSWORD), retry=QUICK) as other:
            with pytest.raises(VendorError) as contact:
                await other.contact(mine)
            assert (contact.value.status, contact.value.code) == (404, "ERROR_CONTACT_NOT_FOUND")
            with pytest.raises(VendorError) as job:
                await other.import_status(import_id)
            assert job.value.code == "contacts:importNotFound"
            assert str((await other.account_info()).id) != DD_ACCOUNT


async def test_bad_password_is_an_authentication_error_without_credentials(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "Wrong-pa55word!"
    async with account(records=0, password=wrong) as (client, _, _):
        with pytest.raises(AuthenticationError) as caught:
            await client.account_info()
        assert caught.value.status == 401
        encoded = base64.b64encode(f"{DD_USER}:{wrong}".encode()).decode()
        assert_hidden((wrong, encoded, DD_PASSWORD), caught.value, client, caplog.text)


async def test_rate_limit_waits_as_told_then_succeeds() -> None:
    events = Events()
    async with account(records=1, events=events) as (client, sim, _):
        await sim.faults(throttle={"limit": 2, "window_s": 1})
        for _ in range(4):
            await client.server_time()
        assert 429 in events.statuses("GET /v2/server-time")
        waited = [e for e in events.seen if e.throttled_wait_s > 0]
        assert waited and all(e.status == 200 for e in waited)


async def test_a_spent_call_budget_pauses_the_client_before_any_429() -> None:
    events = Events()
    async with account(records=0, events=events, sim_kwargs={"calls_per_minute": 3},
                       budget_reserve=0.0) as (client, _, _):
        for _ in range(3):
            await client.server_time()
        # The third answer said no calls remain this minute: the client holds back.
        assert client.pacer.paused_for > 0
        assert 429 not in events.statuses()


async def test_rate_limit_outlasting_the_policy_is_a_throttled_error() -> None:
    async with account(records=0, retry=RetryPolicy(max_throttled_waits=0)) as (client, sim, _):
        await sim.faults(throttle={"limit": 1, "window_s": 60})
        await client.server_time()
        with pytest.raises(ThrottledError) as caught:
            await client.server_time()
        assert caught.value.status == 429
        assert caught.value.retry_after is not None and 0 < caught.value.retry_after <= 60


async def test_server_errors_are_retried_until_success() -> None:
    events = Events()
    async with account(records=2, events=events) as (client, sim, seeded):
        await sim.faults(error_rate={"GET /v2/contacts": 0.7})
        for _ in range(8):
            await client.subscriptions(seeded["emails"][0])
        statuses = events.statuses("GET /v2/contacts/{email}/subscriptions")
        assert any(s >= 500 for s in statuses) and statuses.count(200) == 8


async def test_a_session_passed_in_is_used_and_left_open() -> None:
    async with dotdigital_sim() as sim, aiohttp.ClientSession() as shared:
        async with DotdigitalClient(config=dotdigital_config(sim.url), session=shared) as client:
            await client.server_time()
        assert not shared.closed
        async with DotdigitalClient(config=dotdigital_config(sim.url), session=shared) as again:
            assert (await again.account_info()).id == int(DD_ACCOUNT)


# --- bounded waits: a call never holds its caller for long (the broker's consumer_timeout) -------

async def test_an_import_still_pending_at_its_deadline_is_a_transient_unknown() -> None:
    # The simulator keeps the import "NotFinished" for an hour: polling stops at the deadline.
    async with account(records=2, preferences=2, sim_kwargs={"import_delay_s": 3600},
                       import_deadline_s=0.5) as (client, sim, seeded):
        first = seeded["preferences"][0]
        email = seeded["emails"][0]
        began = time.monotonic()
        async with asyncio.timeout(30):
            with pytest.raises(ImportUnfinished) as caught:
                import_id = await client.start_import(
                    [ImportContact(email=email, preferences={first: False})])
                await client.import_report(import_id, started=began, first_poll_s=0.05)
        assert time.monotonic() - began < 5
        assert dependency_of(caught.value) == "dotdigital"
        assert caught.value.maybe_delivered  # it may land yet: the caller must read back
        await sim.call("POST", "dotdigital/imports/run")
        assert (await client.subscriptions(email)).by_preference()[first].is_opted_in is False


async def test_a_429_storm_with_a_long_retry_after_stops_waiting_at_the_deadline() -> None:
    events = Events()
    async with account(records=0, events=events, call_deadline_s=1.0) as (client, sim, _):
        await sim.faults(throttle={"limit": 1, "window_s": 3600})
        await client.server_time()
        began = time.monotonic()
        async with asyncio.timeout(30):
            with pytest.raises(ThrottledError) as caught:
                await client.server_time()
        assert time.monotonic() - began < 5
        assert caught.value.status == 429 and dependency_of(caught.value) == "dotdigital"
        # The client stays paused as the vendor asked: the next call fails at once, unsent.
        sent = len(events.seen)
        with pytest.raises(ThrottledError):
            await client.server_time()
        assert len(events.seen) == sent


async def test_a_short_retry_after_inside_the_deadline_is_still_waited_out() -> None:
    async with account(records=0, call_deadline_s=30.0) as (client, sim, _):
        await sim.faults(throttle={"limit": 1, "window_s": 1})
        await client.server_time()
        await client.server_time()  # one 429 (Retry-After 1 s), then answered


async def test_an_opt_ins_page_that_does_not_move_on_is_an_error_not_an_endless_read() -> None:
    """A full page whose contacts carry no id at or past where it started would be asked for
    again and again: the read stops with the vendor error instead (a peer answering that way,
    over a real socket)."""
    asked: list[str] = []

    async def opt_ins(request: web.Request) -> web.Response:
        asked.append(request.query.get("minContactId", ""))
        page = [{"contact": {"email": f"p{i}@example.com", "status": "Subscribed"},
                 "marketingPreferenceOptIns": []} for i in range(1000)]
        return web.json_response(page)

    app = web.Application()
    app.router.add_get(
        "/v2/contacts/with-preference/{preference_id}/opt-ins-since/{date}", opt_ins)
    async with serving(app) as url, DotdigitalClient(config=dotdigital_config(url),
                                                     retry=QUICK) as client:
        with pytest.raises(VendorError, match="holds no contact id"):
            async for _ in client.iter_opt_ins_since(1, LONG_AGO):
                pass
        with pytest.raises(VendorError, match="holds no contact id"):
            async for _ in client.iter_opt_ins_since(1, LONG_AGO, emails={"p1@example.com"}):
                pass
    assert asked == ["0", "1", "0", "1"]  # the second page asked for is where it stops
