"""The shared request budget in the ledger store, on both backends: claims of several replicas
(two store instances on one database) never add up to more than the limit in a span
(:mod:`common.vendors.budget`, rules 2-4), and clients sharing it against the dotdigital
simulator together stay inside their API user's budget."""

from __future__ import annotations

import asyncio

import pytest

from common.store import LedgerStore, open_store
from common.vendors.dotdigital.client import DotdigitalClient
from tests.harness.waiting import until
from tests.integration.store.stepped_clock import SteppedClock
from tests.unit.vendors.support import Events, dotdigital_config, dotdigital_sim

pytestmark = pytest.mark.anyio

SPAN = 61.0


async def test_claims_of_replicas_share_one_limit(store: LedgerStore, other: LedgerStore) -> None:
    first = await store.claim_budget("dotdigital:u", "r1", tokens=20, limit=28, span_s=SPAN)
    assert (first.tokens, first.claimers) == (20, 1)
    second = await other.claim_budget("dotdigital:u", "r2", tokens=20, limit=28, span_s=SPAN)
    assert (second.tokens, second.claimers) == (8, 2)  # what was left
    refused = await store.claim_budget("dotdigital:u", "r1", tokens=1, limit=28, span_s=SPAN)
    assert refused.tokens == 0 and SPAN - 5 < refused.wait_s <= SPAN
    assert refused.claimers == 2
    # another bucket (another API user) has a budget of its own
    assert (await other.claim_budget("dotdigital:v", "r2", tokens=28, limit=28,
                                     span_s=SPAN)).tokens == 28


async def test_claims_are_forgotten_after_the_span(store: LedgerStore, other: LedgerStore,
                                                   clock: SteppedClock) -> None:
    assert (await store.claim_budget("b", "r1", tokens=5, limit=5, span_s=0.2)).tokens == 5
    refused = await other.claim_budget("b", "r2", tokens=1, limit=5, span_s=0.2)
    assert refused.tokens == 0 and 0 < refused.wait_s <= 0.2
    clock.advance(0.3)
    again = await other.claim_budget("b", "r2", tokens=5, limit=5, span_s=0.2)
    assert (again.tokens, again.claimers) == (5, 1)  # r1 is forgotten too


async def test_racing_claims_never_overspend(url: str) -> None:
    stores = [open_store(url) for _ in range(6)]
    for s in stores:
        await s.open()
    try:
        grants = await asyncio.gather(*(
            s.claim_budget("dynamics:u", f"r{i}", tokens=4, limit=28, span_s=SPAN)
            for i, s in enumerate(stores) for _ in range(3)))
    finally:
        for s in stores:
            await s.close()
    assert sum(g.tokens for g in grants) == 28


async def test_two_clients_sharing_the_store_stay_inside_the_budget_together(
        store: LedgerStore, other: LedgerStore) -> None:
    """Two processes (each with its store) calling dotdigital as the same API user: together
    they send the budget less its reserve in a window, not that much each. The simulator sets
    no limit of its own here, so only the shared budget holds them back."""
    events = Events()
    async with dotdigital_sim() as sim:
        config = dotdigital_config(sim.url, calls_per_minute=35, max_concurrency=4)
        async with DotdigitalClient(config=config, on_request=events,
                                    budget_ledger=store) as one, \
                DotdigitalClient(config=config, on_request=events,
                                 budget_ledger=other) as two:
            calls = [asyncio.ensure_future(client.server_time())
                     for client in (one, two) for _ in range(20)]
            await until(lambda: len(events.seen) >= 28
                        and one.pacer.waiting + two.pacer.waiting >= 1,
                        timeout_s=30, every=0.01, what="28 calls answered and one held back")
            assert (await sim.stats())["total_calls"] == 28 == len(events.seen)
            assert sum(c.done() for c in calls) == 28
            # the store's ledger holds the rest back for about a minute
            probe = await store.claim_budget("dotdigital:" + config.api_user, "probe",
                                             tokens=1, limit=28, span_s=SPAN)
            assert probe.tokens == 0 and probe.wait_s > 50
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
