"""Pacing to the vendor's window, against the dotdigital simulator: the budget less its reserve
goes at once, the vendor's own count keeps the reserve, and no call it would refuse is sent."""

from __future__ import annotations

import asyncio

import pytest

from common.vendors.dotdigital.client import DotdigitalClient
from tests.harness.waiting import until

from .support import Events, dotdigital_config, dotdigital_sim

pytestmark = pytest.mark.anyio


async def _settle(client: DotdigitalClient, events: Events, go: int) -> asyncio.Task[object]:
    """Start ``go`` + 1 calls; once ``go`` have been answered and one waits for budget, that
    one (still held back)."""
    before = len(events.seen)
    tasks = [asyncio.ensure_future(client.server_time()) for _ in range(go + 1)]
    await until(lambda: len(events.seen) >= before + go and client.pacer.waiting >= 1,
                timeout_s=30, every=0.01, what=f"{go} calls answered and one held back")
    held = [t for t in tasks if not t.done()]
    assert len(held) == 1 and len(events.seen) == before + go
    return held[0]


async def test_after_an_idle_window_the_budget_less_its_reserve_goes_at_once() -> None:
    events = Events()
    async with dotdigital_sim(calls_per_minute=10) as sim, DotdigitalClient(
            config=dotdigital_config(sim.url, calls_per_minute=10), on_request=events) as client:
        # 8 of 10 (a reserve of 2 for the customer's other integrations), not a tenth and a
        # trickle: the ninth waits for the window
        held = await _settle(client, events, 8)
        assert 429 not in events.statuses()
        assert (await sim.stats())["total_calls"] == 8
        held.cancel()


async def test_the_reserve_the_vendor_reports_is_left_to_others() -> None:
    """The account's window is partly spent by another integration: the client spends what
    remains of it but the reserve, although its own budget is untouched."""
    events = Events()
    async with dotdigital_sim(calls_per_minute=10) as sim, DotdigitalClient(
            config=dotdigital_config(sim.url, calls_per_minute=10), on_request=events) as client, \
            DotdigitalClient(config=dotdigital_config(sim.url, calls_per_minute=10,
                                                      budget_reserve=0.0)) as other:
        for _ in range(5):
            await other.server_time()  # the other integration: 5 of the window's 10
        await client.server_time()  # the window, as the vendor counts it, is now known
        held = await _settle(client, events, 2)
        # 5 + 1 + 2 leaves the 2 of the reserve
        assert (await sim.stats())["total_calls"] == 8
        assert 429 not in events.statuses()
        held.cancel()


async def test_the_configured_budget_caps_what_a_window_allows() -> None:
    """A client configured for less than the account allows spends only its own budget (less
    its reserve) in each of the vendor's windows."""
    events = Events()
    async with dotdigital_sim(calls_per_minute=100) as sim, DotdigitalClient(
            config=dotdigital_config(sim.url, calls_per_minute=5), on_request=events) as client:
        held = await _settle(client, events, 4)
        assert (await sim.stats())["total_calls"] == 4
        held.cancel()
