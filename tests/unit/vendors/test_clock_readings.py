"""Each vendor's clock measured through its client against the simulators, over real sockets:
dotdigital's ``/v2/server-time``, Dataverse's ``Date`` headers and the ``modifiedon`` of our own
``$batch`` writes, folded into the account's estimate with their uncertainty."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from common.store import SqliteLedgerStore
from common.vendors.clock_skew import measure_clock
from common.vendors.dataverse.client import BatchOperation, DataverseClient
from common.vendors.dotdigital.client import DotdigitalClient
from tests.unit.vendors.support import (
    DD_ACCOUNT,
    SimControl,
    dotdigital_config,
    dotdigital_sim,
    dynamics_config,
    dynamics_sim,
)

pytestmark = pytest.mark.anyio

SERVER_TIME = "GET /v2/server-time"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteLedgerStore]:
    async with SqliteLedgerStore(path=str(tmp_path / "ledger.db")) as s:
        yield s


@pytest.mark.parametrize("offset", [0.0, 30.0, -30.0])
async def test_dotdigital_server_time_measures_its_offset(store: SqliteLedgerStore,
                                                          offset: float) -> None:
    async with dotdigital_sim() as sim, DotdigitalClient(
            config=dotdigital_config(sim.url)) as client:
        await sim.seed(records=2, preferences=1, seed=5, account=DD_ACCOUNT)
        await sim.clock(offset_s=offset)
        await client.server_time()
        estimate = await measure_clock(store, account="acme", side="dotdigital", client=client)
        assert estimate is not None
        assert abs(estimate.offset_s - offset) <= estimate.uncertainty_s
        assert estimate.uncertainty_s < 0.25     # half a loopback round trip, give or take
        # in agreement with the estimate: no call made for the clock
        assert (await sim.stats())["calls"][SERVER_TIME] == 1


async def test_a_dotdigital_clock_step_costs_two_more_calls_and_is_followed(
        store: SqliteLedgerStore) -> None:
    async with dotdigital_sim() as sim, DotdigitalClient(
            config=dotdigital_config(sim.url)) as client:
        await sim.seed(records=2, preferences=1, seed=5, account=DD_ACCOUNT)
        for _ in range(3):
            await client.server_time()
            await measure_clock(store, account="acme", side="dotdigital", client=client)
        await sim.clock(offset_s=30)
        await client.server_time()       # the ec-poller's call at the start of a run
        estimate = await measure_clock(store, account="acme", side="dotdigital", client=client)
        assert estimate is not None and abs(estimate.offset_s - 30) < 0.25
        assert (await sim.stats())["calls"][SERVER_TIME] == 3 + 1 + 2


@pytest.mark.parametrize("offset", [0.0, 30.0, -30.0])
async def test_dataverse_date_headers_measure_its_offset(store: SqliteLedgerStore,
                                                         offset: float) -> None:
    async with dynamics_sim() as sim, DataverseClient(config=dynamics_config(sim.url)) as client:
        await sim.seed(records=3, preferences=2, seed=3)
        await sim.clock(offset_s=offset)
        await client.service_document()
        estimate = await measure_clock(store, account="acme", side="dynamics", client=client)
        assert estimate is not None
        assert abs(estimate.offset_s - offset) <= estimate.uncertainty_s
        assert 0.5 <= estimate.uncertainty_s < 0.75   # a whole-second Date, and the round trip


async def test_our_own_writes_stamps_bound_the_dataverse_clock(store: SqliteLedgerStore) -> None:
    async with dynamics_sim() as sim, DataverseClient(config=dynamics_config(sim.url)) as client:
        await sim.seed(records=3, preferences=2, seed=3)
        await sim.clock(offset_s=-30)
        page = await client.get("contacts", params={"$select": "contactid", "$top": "1"})
        contact = page["value"][0]["contactid"]
        client.clock_readings.take()
        await client.batch([BatchOperation.update("contacts", contact, {"firstname": "Sam"},
                                                  return_representation=True,
                                                  content_id="1")])
        sources = [r.source for r in client.clock_readings.take()]
        assert sources == ["date", "write"]


async def test_readings_that_agree_with_what_the_caller_holds_are_not_recorded(
        store: SqliteLedgerStore) -> None:
    async with dotdigital_sim() as sim, DotdigitalClient(
            config=dotdigital_config(sim.url)) as client:
        await sim.seed(records=2, preferences=1, seed=5, account=DD_ACCOUNT)
        await client.server_time()
        held = await measure_clock(store, account="acme", side="dotdigital", client=client)
        before = await store.get_checkpoint("acme", "clock:dotdigital")
        await client.server_time()
        assert await measure_clock(store, account="acme", side="dotdigital", client=client,
                                   holding=held) is held
        assert await store.get_checkpoint("acme", "clock:dotdigital") == before
        # one that disagrees is recorded (and checked with more reads)
        await sim.clock(offset_s=30)
        await client.server_time()
        moved = await measure_clock(store, account="acme", side="dotdigital", client=client,
                                    holding=held)
        assert moved is not None and abs(moved.offset_s - 30) < 0.25


@pytest.mark.parametrize("offset", [0.0, 30.0])
async def test_the_answer_that_bounds_a_read_measures_the_dotdigital_clock(
        store: SqliteLedgerStore, offset: float) -> None:
    """The ec-poller's run: its first answer's ``Date`` bounds the run's start and is the
    clock sample of the run; no server-time call."""
    async with dotdigital_sim() as sim, DotdigitalClient(
            config=dotdigital_config(sim.url)) as client:
        await sim.seed(records=2, preferences=1, seed=5, account=DD_ACCOUNT)
        await sim.clock(offset_s=offset)
        moment = time.time()
        await client.preferences()
        await client.time_before(moment)
        estimate = await measure_clock(store, account="acme", side="dotdigital", client=client)
        assert estimate is not None
        assert abs(estimate.offset_s - offset) <= estimate.uncertainty_s
        assert 0.5 <= estimate.uncertainty_s < 0.75   # a whole-second Date, and the round trip
        assert SERVER_TIME not in (await sim.stats())["calls"]


async def test_other_answers_are_no_clock_samples(store: SqliteLedgerStore) -> None:
    """Only server-time and the answer bounding a read's start: an answer's reading folded in
    late, after the clock stepped, would pass for a step back."""
    async with dotdigital_sim() as sim, DotdigitalClient(
            config=dotdigital_config(sim.url)) as client:
        await sim.seed(records=2, preferences=1, seed=5, account=DD_ACCOUNT)
        await client.preferences()
        await client.account_info()
        assert client.clock_readings.take() == []


async def sim_now(sim: SimControl) -> datetime:
    return datetime.fromisoformat((await sim.call("GET", "clock"))["now"])


@pytest.mark.parametrize("latency_ms", [0, 1500])
async def test_the_time_before_a_read_is_one_its_clock_had_passed(latency_ms: int) -> None:
    """From the read's own answer, however long it took: never later than dotdigital's clock
    when the read began (a change stamped after that is read next time), and at most two
    seconds and a round trip earlier (a whole-second Date, less a second in case it rounds)."""
    async with dotdigital_sim() as sim, DotdigitalClient(
            config=dotdigital_config(sim.url)) as client:
        await sim.seed(records=2, preferences=1, seed=5, account=DD_ACCOUNT)
        await sim.clock(offset_s=30)
        await sim.faults(latency_ms={"GET /v2/preferences": latency_ms})
        before = await sim_now(sim)
        moment = time.time()
        await client.preferences()
        watermark = await client.time_before(moment)
        assert before - timedelta(seconds=2.25) < watermark <= before
        assert SERVER_TIME not in (await sim.stats())["calls"]


async def test_with_no_answer_since_the_time_before_costs_one_server_time_call() -> None:
    async with dotdigital_sim() as sim, DotdigitalClient(
            config=dotdigital_config(sim.url)) as client:
        await sim.seed(records=2, preferences=1, seed=5, account=DD_ACCOUNT)
        await client.preferences()
        before = await sim_now(sim)
        moment = time.time()
        watermark = await client.time_before(moment)
        assert before - timedelta(seconds=0.25) < watermark <= before + timedelta(seconds=0.25)
        assert (await sim.stats())["calls"][SERVER_TIME] == 1


@pytest.mark.parametrize("latency_ms", [0, 1500])
async def test_a_writes_window_ends_after_what_it_wrote_was_stamped(latency_ms: int) -> None:
    """From the write's own answer: dotdigital stamped the change before it answered, so the
    stamp is never after the end (a whole-second Date, plus that second); no server-time call."""
    async with dotdigital_sim() as sim, DotdigitalClient(
            config=dotdigital_config(sim.url)) as client:
        seeded = await sim.seed(records=2, preferences=1, seed=5, account=DD_ACCOUNT)
        email, preference = seeded["emails"][0], int(seeded["preferences"][0])
        await sim.clock(offset_s=-30)
        await client.preferences()  # the tree, read before the write began
        await sim.faults(latency_ms={"PUT /v2/contacts/{id_or_email}/preferences": latency_ms})
        began = time.time()
        await client.update_contact_preferences(email, {preference: False})
        end = await client.time_after(began)
        stamped = (await client.subscriptions(email)).by_preference()[preference].modified
        assert stamped <= end <= await sim_now(sim) + timedelta(seconds=1)
        assert SERVER_TIME not in (await sim.stats())["calls"]


async def test_an_answer_bounding_two_reads_is_one_clock_sample() -> None:
    async with dotdigital_sim() as sim, DotdigitalClient(
            config=dotdigital_config(sim.url)) as client:
        await sim.seed(records=2, preferences=1, seed=5, account=DD_ACCOUNT)
        moment = time.time()
        await client.preferences()
        assert await client.time_before(moment) == await client.time_before(moment)
        assert len(client.clock_readings.take()) == 1
