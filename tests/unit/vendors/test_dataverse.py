"""DataverseClient against the Dataverse simulator, over real sockets."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest

from common.messaging.resilience import dependency_of
from common.vendors.base import (
    AuthenticationError,
    RetryPolicy,
    ThrottledError,
    VendorError,
    WriteRefused,
)
from common.vendors.dataverse.client import (
    CONCURRENCY_VERSION_MISMATCH,
    EXPIRED_VERSION_STAMP,
    OBJECT_DOES_NOT_EXIST,
    BatchOperation,
    DataverseClient,
    DeltaTokenExpired,
    Query,
    odata_literal,
)
from tests.unit.vendors.support import (
    SECRET,
    Events,
    SimControl,
    assert_hidden,
    dynamics_config,
    dynamics_sim,
)

pytestmark = pytest.mark.anyio

COLUMNS = ["emailaddress1", "donotbulkemail", "versionnumber", "modifiedon"]
CONTACTS = "GET /api/data/v9.2/contacts"
TOKEN = "POST /{tenant}/oauth2/v2.0/token"
QUICK = RetryPolicy(attempts=40, base_delay_s=0.001, max_delay_s=0.01)


@asynccontextmanager
async def org(records: int = 20, *, events: Events | None = None, retry: RetryPolicy = QUICK,
              clock: Any = None, sim_kwargs: dict[str, Any] | None = None,
              read_only: bool = False,
              **config: Any) -> AsyncIterator[tuple[DataverseClient, SimControl]]:
    async with dynamics_sim(**(sim_kwargs or {})) as sim:
        if records:
            await sim.seed(records=records, preferences=2, seed=3)
        extra: dict[str, Any] = {"clock": clock} if clock is not None else {}
        extra["read_only"] = read_only
        async with DataverseClient(config=dynamics_config(sim.url, **config), on_request=events,
                                   retry=retry, **extra) as client:
            yield client, sim


async def all_rows(client: DataverseClient, **kwargs: Any) -> list[dict[str, Any]]:
    return [row async for page in client.iter_pages("contacts", **kwargs) for row in page.rows]


async def test_service_document_lists_entity_sets() -> None:
    async with org(records=0) as (client, _):
        document = await client.service_document()
        assert "contacts" in {item["name"] for item in document["value"]}


async def test_pages_follow_next_links_with_the_same_page_size() -> None:
    events = Events()
    async with org(records=30, events=events) as (client, _):
        total = len(await all_rows(client, select=["contactid"]))
        assert 20 < total <= 30  # about one seeded person in five is a lead
        pages = [page async for page in client.iter_pages("contacts", select=COLUMNS,
                                                          orderby="contactid", page_size=10)]
        assert [len(p.rows) for p in pages[:-1]] == [10] * (len(pages) - 1)
        assert 0 < len(pages[-1].rows) <= 10 and pages[-1].next_link is None
        ids = [row["contactid"] for p in pages for row in p.rows]
        assert len(ids) == len(set(ids)) == total
        # Every page is reported under the entity set's route template, never with ids.
        assert events.statuses(CONTACTS) == [200] * (1 + len(pages))


async def test_get_and_filters_with_literals() -> None:
    async with org(records=5) as (client, _):
        [first] = (await all_rows(client, select=COLUMNS, orderby="contactid"))[:1]
        row = await client.get(f"contacts({first['contactid']})",
                               params={"$select": "emailaddress1"})
        assert row["emailaddress1"] == first["emailaddress1"]
        found = await all_rows(client, select=COLUMNS,
                               filter=f"emailaddress1 eq {odata_literal(first['emailaddress1'])}")
        assert [r["contactid"] for r in found] == [first["contactid"]]


async def test_rows_by_ids_in_chunks_that_keep_urls_short() -> None:
    events = Events()
    async with org(records=40, events=events) as (client, _):
        rows = await all_rows(client, select=COLUMNS)
        wanted = [r["contactid"] for r in rows[:30]]
        unknown = [f"00000000-0000-4000-8000-{i:012d}" for i in range(400)]
        found = await client.get_rows_by_ids("contacts", id_column="contactid",
                                             ids=wanted + unknown, select=["emailaddress1"])
        assert sorted(r["contactid"] for r in found) == sorted(wanted)
        assert len(events.statuses(CONTACTS)) > 2  # several chunks, each its own request


async def test_bad_query_surfaces_the_vendor_code() -> None:
    async with org(records=1) as (client, _):
        with pytest.raises(VendorError) as caught:
            await all_rows(client, select=["nosuchcolumn"])
        assert caught.value.status == 400
        assert caught.value.code == "0x80060888"
        assert "nosuchcolumn" in caught.value.message


async def test_deltas_report_updates_creates_and_deletes() -> None:
    async with org(records=12) as (client, _):
        rows: list[dict[str, Any]] = []
        cursor = None
        async for page in client.iter_changes("contacts", select=COLUMNS, cursor=None,
                                              page_size=5):
            rows += page.rows
            cursor = page.cursor
            assert (page.delta_link is None) == (page.next_link is not None)
        assert cursor is not None and "$deltatoken=" in cursor
        assert len(rows) == len(await all_rows(client, select=["contactid"]))
        changed, removed = rows[0]["contactid"], rows[1]["contactid"]
        await client.update("contacts", changed, {"donotbulkemail": True})
        await client.delete("contacts", removed)
        made = await client.create("contacts", {"lastname": "Novak",
                                                "emailaddress1": "new.one@example.com"})
        assert made.entity_id is not None

        pages = [p async for p in client.iter_changes("contacts", select=COLUMNS, cursor=cursor)]
        assert len(pages) == 1 and pages[0].delta_link is not None
        assert sorted(r["contactid"] for r in pages[0].rows) == sorted([changed, made.entity_id])
        assert pages[0].deleted_ids == [removed]

        # Nothing changed since: an empty delta with a fresh link.
        again = [p async for p in client.iter_changes("contacts", select=COLUMNS,
                                                      cursor=pages[0].cursor)]
        assert again[0].rows == [] and again[0].deleted_ids == []


async def test_an_interrupted_full_read_resumes_from_its_next_link() -> None:
    async with org(records=12) as (client, _):
        first_pages = client.iter_changes("contacts", select=COLUMNS, cursor=None, page_size=5)
        first = await anext(first_pages)
        await first_pages.aclose()
        assert first.next_link is not None and first.delta_link is None
        rest = [p async for p in client.iter_changes("contacts", select=COLUMNS,
                                                     cursor=first.cursor, page_size=5)]
        ids = [r["contactid"] for r in first.rows] + [r["contactid"] for p in rest
                                                      for r in p.rows]
        assert len(ids) == len(set(ids)) == len(await all_rows(client, select=["contactid"]))
        assert rest[-1].delta_link is not None


async def test_expired_delta_token_asks_for_a_full_read() -> None:
    events = Events()
    async with org(records=3, events=events) as (client, sim):
        cursor = [p async for p in client.iter_changes("contacts", select=COLUMNS,
                                                       cursor=None)][-1].cursor
        await sim.clock(offset_s=8 * 24 * 3600)  # past the 7-day retention (and the token)
        with pytest.raises(DeltaTokenExpired) as caught:
            [p async for p in client.iter_changes("contacts", select=COLUMNS, cursor=cursor)]
        assert caught.value.status == 400
        assert caught.value.code == EXPIRED_VERSION_STAMP
        assert 401 in events.statuses(CONTACTS)  # the token expired too, and was renewed


async def test_a_mangled_delta_link_also_means_a_full_read() -> None:
    async with org(records=3) as (client, _):
        cursor = [p async for p in client.iter_changes("contacts", select=COLUMNS,
                                                       cursor=None)][-1].cursor
        broken = cursor.split("$deltatoken=")[0] + "$deltatoken=garbage"
        with pytest.raises(DeltaTokenExpired) as caught:
            [p async for p in client.iter_changes("contacts", select=COLUMNS, cursor=broken)]
        assert 400 <= caught.value.status < 500


async def test_links_to_other_hosts_are_not_followed() -> None:
    async with org(records=1) as (client, _):
        with pytest.raises(VendorError) as caught:
            [p async for p in client.iter_changes(
                "contacts", select=COLUMNS,
                cursor="https://elsewhere.example.com/api/data/v9.2/contacts?$deltatoken=1")]
        assert "another host" in caught.value.message


async def test_etag_conflict_is_a_412_with_the_concurrency_code() -> None:
    async with org(records=2) as (client, _):
        row = (await all_rows(client, select=COLUMNS))[0]
        stale = row["@odata.etag"]
        written = await client.update("contacts", row["contactid"], {"donotbulkemail": True},
                                      if_match=stale, return_representation=True,
                                      select=["versionnumber", "modifiedon"])
        assert written.status == 200
        assert written.etag is not None and written.etag != stale
        assert written.body is not None and written.body["versionnumber"] > row["versionnumber"]
        with pytest.raises(VendorError) as caught:
            await client.update("contacts", row["contactid"], {"donotbulkemail": False},
                                if_match=stale)
        assert caught.value.status == 412
        assert caught.value.code == CONCURRENCY_VERSION_MISMATCH
        await client.update("contacts", row["contactid"], {"donotbulkemail": False},
                            if_match=written.etag)


async def test_updating_a_missing_row_is_a_404_not_an_upsert() -> None:
    async with org(records=0) as (client, _):
        missing = "00000000-0000-4000-8000-000000000001"
        with pytest.raises(VendorError) as caught:
            await client.update("contacts", missing, {"lastname": "Ghost"})
        assert (caught.value.status, caught.value.code) == (404, OBJECT_DOES_NOT_EXIST)
        upserted = await client.update("contacts", missing, {"lastname": "Ghost"}, if_match=None)
        assert upserted.entity_id == missing


async def test_batch_change_set_returns_per_operation_representations() -> None:
    async with org(records=3) as (client, _):
        rows = await all_rows(client, select=COLUMNS)
        ops = [BatchOperation.update("contacts", r["contactid"], {"donotbulkemail": True},
                                     if_match=r["@odata.etag"], return_representation=True)
               for r in rows]
        ops.append(BatchOperation.create("contacts", {"lastname": "Reyes"},
                                         return_representation=True))
        results = await client.batch(ops)
        assert [r.ok for r in results] == [True] * 4
        assert [r.content_id for r in results] == ["1", "2", "3", "4"]
        for row, result in zip(rows, results, strict=False):
            assert result.body is not None
            assert result.body["versionnumber"] > row["versionnumber"]
            assert result.etag is not None and result.etag != row["@odata.etag"]
        assert results[3].status == 201 and results[3].entity_id is not None
        after = await all_rows(client, select=COLUMNS)
        assert sum(1 for r in after if r["donotbulkemail"]) >= 3


async def test_batch_writes_return_only_the_selected_columns_and_failures_their_code() -> None:
    async with org(records=2) as (client, _):
        rows = await all_rows(client, select=COLUMNS, orderby="contactid")
        await client.update("contacts", rows[1]["contactid"], {"lastname": "Moved on"})
        asked = ("versionnumber", "modifiedon")
        ops = [BatchOperation.update("contacts", r["contactid"], {"donotbulkemail": True},
                                     if_match=r["@odata.etag"], return_representation=True,
                                     select=asked) for r in rows]
        ops.append(BatchOperation.create("contacts", {"lastname": "Reyes"},
                                         return_representation=True, select=asked))
        results = await client.batch(ops, change_set=False, continue_on_error=True)
        assert [r.status for r in results] == [200, 412, 201]
        failing = results[1].error
        assert failing is not None and failing.code == CONCURRENCY_VERSION_MISMATCH
        for result in (results[0], results[2]):
            assert result.body is not None
            # the key comes with the selected columns, as with every returned row
            assert set(result.body) == {"@odata.context", "@odata.etag", "contactid", *asked}
        assert results[0].body is not None and \
            results[0].body["versionnumber"] > rows[0]["versionnumber"]
        assert results[2].body is not None and \
            results[2].entity_id == results[2].body["contactid"]


async def test_failed_change_set_rolls_back_and_names_the_failing_operation() -> None:
    async with org(records=3) as (client, _):
        rows = await all_rows(client, select=COLUMNS, orderby="contactid")
        await client.update("contacts", rows[1]["contactid"], {"lastname": "Moved on"})
        ops = [BatchOperation.update("contacts", r["contactid"], {"donotbulkemail": True},
                                     if_match=r["@odata.etag"]) for r in rows]
        results = await client.batch(ops)
        assert [r.status for r in results] == [424, 412, 424]
        failing = results[1].error
        assert failing is not None and failing.code == CONCURRENCY_VERSION_MISMATCH
        assert results[0].error is not None and "operation 2" in results[0].error.message
        after = {r["contactid"]: r for r in await all_rows(client, select=COLUMNS)}
        assert not any(after[r["contactid"]]["donotbulkemail"] for r in rows)  # rolled back


async def test_batch_without_change_set_continues_on_error() -> None:
    async with org(records=2) as (client, _):
        rows = await all_rows(client, select=COLUMNS)
        missing = "00000000-0000-4000-8000-000000000009"
        ops = [BatchOperation.update("contacts", rows[0]["contactid"], {"donotbulkemail": True}),
               BatchOperation.update("contacts", missing, {"donotbulkemail": True}),
               BatchOperation(method="GET", path=f"contacts({rows[1]['contactid']})"
                                                 "?$select=emailaddress1")]
        results = await client.batch(ops, change_set=False, continue_on_error=True)
        assert [r.status for r in results] == [204, 404, 200]
        assert results[1].error is not None and results[1].error.code == OBJECT_DOES_NOT_EXIST
        assert results[2].body is not None
        assert results[2].body["emailaddress1"] == rows[1]["emailaddress1"]

        stopped = await client.batch(ops, change_set=False)
        assert [r.status for r in stopped] == [204, 404, 424]


async def test_reads_together_in_one_batch_then_the_rest_of_their_pages() -> None:
    events = Events()
    async with org(records=30, events=events) as (client, _):
        every = await all_rows(client, select=["contactid"])
        read = await client.read_together([
            Query(entity_set="contacts", select=["contactid"], page_size=7),
            Query(entity_set="lists", select=["listid"], filter="createdfromcode eq 4")])
        assert events.statuses("POST /api/data/v9.2/$batch") == [200]
        contacts, lists = read.pages
        assert len(lists.rows) == 1 and lists.next_link is None
        later = [p async for p in client.rest_of(contacts, entity_set="contacts", page_size=7)]
        assert [r["contactid"] for p in (contacts, *later) for r in p.rows] == \
            [r["contactid"] for r in every]
        assert read.date is not None and abs((read.date - datetime.now(UTC)).total_seconds()) < 5
        with pytest.raises(VendorError) as caught:
            await client.read_together([Query(entity_set="contacts", select=["nosuchcolumn"])])
        assert caught.value.code == "0x80060888"


async def test_a_read_only_client_batches_reads_but_no_writes() -> None:
    async with org(records=2, read_only=True) as (client, _):
        read = await client.read_together([Query(entity_set="contacts", select=["contactid"])])
        (contact, *_) = read.pages[0].rows
        with pytest.raises(WriteRefused):
            await client.batch([BatchOperation.update("contacts", contact["contactid"],
                                                      {"donotbulkemail": True})])


async def test_more_than_1000_operations_go_in_several_batches() -> None:
    events = Events()
    async with org(records=1300, events=events) as (client, _):
        rows = (await all_rows(client, select=["contactid"]))[:1001]
        assert len(rows) == 1001
        ops = [BatchOperation.update("contacts", r["contactid"], {"donotbulkemail": True})
               for r in rows]
        results = await client.batch(ops)
        assert len(results) == 1001 and all(r.ok for r in results)
        assert events.statuses("POST /api/data/v9.2/$batch") == [200, 200]


async def test_independent_batches_answer_in_order_and_one_failure_stops_none() -> None:
    events = Events()
    async with org(records=2700, events=events) as (client, _):
        rows = (await all_rows(client, select=["contactid"]))[:2001]
        assert len(rows) == 2001
        ops = [BatchOperation.update("contacts", r["contactid"], {"donotbulkemail": True},
                                     content_id=f"op-{i}") for i, r in enumerate(rows)]
        ops[1500] = BatchOperation.update("contacts", "00000000-0000-0000-0000-000000000000",
                                          {"donotbulkemail": True}, content_id="op-1500")
        results = await client.batch(ops, change_set=False, continue_on_error=True)
        assert [r.content_id for r in results] == [op.content_id for op in ops]
        assert [i for i, r in enumerate(results) if not r.ok] == [1500]
        assert events.statuses("POST /api/data/v9.2/$batch") == [200, 200, 200]


async def test_throttling_waits_as_told_then_succeeds() -> None:
    events = Events()
    async with org(records=3, events=events) as (client, sim):
        await sim.faults(throttle={"limit": 2, "window_s": 1})
        for _ in range(4):
            assert len(await all_rows(client, select=COLUMNS)) == 3
        batch = await client.batch([BatchOperation(method="GET", path="contacts?$select=fullname")],
                                   change_set=False)
        assert batch[0].ok
        assert 429 in events.statuses()
        waited = [e for e in events.seen if e.throttled_wait_s > 0]
        assert waited and all(e.status != 429 for e in waited)


async def test_a_throttled_batch_is_sent_again_after_the_wait() -> None:
    events = Events()
    async with org(records=2, events=events) as (client, sim):
        rows = await all_rows(client, select=COLUMNS)
        await sim.faults(throttle={"limit": 1, "window_s": 1})
        await client.service_document()  # spends the one call of this second
        results = await client.batch([BatchOperation.update(
            "contacts", r["contactid"], {"donotbulkemail": True}) for r in rows])
        assert all(r.ok for r in results)
        assert events.statuses("POST /api/data/v9.2/$batch") == [429, 200]


async def test_pacing_keeps_inside_the_service_protection_limit() -> None:
    from services.simulators.dynamics import ServiceLimits

    events = Events()
    async with org(records=2, events=events, requests_per_window=4, window_s=1.0,
                   sim_kwargs={"limits": ServiceLimits(requests=5, window_s=1.0)}) as (client, _):
        for _ in range(10):
            await client.service_document()
        assert 429 not in events.statuses()


async def test_throttling_that_outlasts_the_policy_raises_throttled_error() -> None:
    async with org(records=1, retry=RetryPolicy(max_throttled_waits=0)) as (client, sim):
        await sim.faults(throttle={"limit": 1, "window_s": 60})
        await all_rows(client)
        with pytest.raises(ThrottledError) as caught:
            await all_rows(client)
        assert caught.value.retry_after is not None and caught.value.retry_after > 0


async def test_server_errors_are_retried_until_success() -> None:
    events = Events()
    async with org(records=3, events=events) as (client, sim):
        await sim.faults(error_rate={"GET /api/data/v9.2/contacts": 0.7})
        for _ in range(8):
            assert len(await all_rows(client, select=COLUMNS)) == 3
        statuses = events.statuses(CONTACTS)
        assert any(s >= 500 for s in statuses) and statuses.count(200) == 8


async def test_creates_are_not_retried_after_a_server_error() -> None:
    events = Events()
    async with org(records=0, events=events) as (client, sim):
        await sim.faults(error_rate={"POST /api/data/v9.2/contacts": 1.0})
        with pytest.raises(VendorError) as caught:
            await client.create("contacts", {"lastname": "Once"})
        assert caught.value.status >= 500
        assert events.statuses("POST /api/data/v9.2/contacts") == [caught.value.status]


async def test_expired_token_is_renewed_once_and_the_call_repeated() -> None:
    events = Events()
    async with org(records=2, events=events) as (client, sim):
        await all_rows(client)
        await sim.clock(offset_s=2 * 3600)  # the simulator now sees the token as expired
        assert len(await all_rows(client)) == 2
        assert events.statuses(TOKEN) == [200, 200]
        assert events.statuses(CONTACTS) == [200, 401, 200]


async def test_token_is_renewed_before_it_expires() -> None:
    now = [1000.0]
    events = Events()
    async with org(records=1, events=events, clock=lambda: now[0],
                   sim_kwargs={"token_lifetime_s": 600}) as (client, _):
        await all_rows(client)
        now[0] += 550  # inside the renewal margin, before the token's expiry
        await all_rows(client)
        assert events.statuses(TOKEN) == [200, 200]
        assert 401 not in events.statuses(CONTACTS)


async def test_bad_secret_is_an_authentication_error_without_the_secret(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-secret-value-123"
    async with org(records=0, secret=wrong) as (client, _):
        with pytest.raises(AuthenticationError) as caught:
            await client.service_document()
        assert caught.value.code == "invalid_client"
        assert "AADSTS7000215" in caught.value.message
        assert_hidden((wrong, SECRET), caught.value, client, caplog.text)


async def test_a_429_storm_with_a_long_retry_after_stops_waiting_at_the_deadline() -> None:
    # Waiting as asked would hold the caller's message past the broker's consumer_timeout.
    async with org(records=1, call_deadline_s=1.0) as (client, sim):
        await sim.faults(throttle={"limit": 1, "window_s": 3600})
        await all_rows(client)
        began = time.monotonic()
        async with asyncio.timeout(30):
            with pytest.raises(ThrottledError) as caught:
                await all_rows(client)
        assert time.monotonic() - began < 5
        assert dependency_of(caught.value) == "dataverse"
