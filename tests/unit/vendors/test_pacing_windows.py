"""Pacing to the vendor's own window: the whole budget of each window, no call it would refuse."""

from __future__ import annotations

import asyncio
import time

import pytest

from common.vendors.dotdigital.client import DotdigitalClient

from .support import Events, dotdigital_config, dotdigital_sim

pytestmark = pytest.mark.anyio


async def test_a_window_reported_by_the_vendor_is_spent_at_once_then_waited_out() -> None:
    events = Events()
    async with dotdigital_sim(calls_per_minute=10) as sim, DotdigitalClient(
            config=dotdigital_config(sim.url, calls_per_minute=10), on_request=events) as client:
        started = time.monotonic()
        for _ in range(10):
            await client.server_time()
        spent = time.monotonic() - started
        eleventh = asyncio.ensure_future(client.server_time())
        await asyncio.sleep(0.5)

        # Leaked evenly, ten calls of a 10-a-minute budget take most of a minute; the vendor
        # said how many remain in its window, so they go at once, and the eleventh waits.
        assert spent < 10
        assert not eleventh.done()
        assert 429 not in events.statuses()
        eleventh.cancel()


async def test_the_configured_budget_caps_what_a_window_allows() -> None:
    """A client configured for less than the account allows (replicas sharing an account)
    spends only its own budget in each of the vendor's windows."""
    async with dotdigital_sim(calls_per_minute=100) as sim, DotdigitalClient(
            config=dotdigital_config(sim.url, calls_per_minute=5)) as client:
        for _ in range(5):
            await client.server_time()
        sixth = asyncio.ensure_future(client.server_time())
        await asyncio.sleep(0.5)

        assert not sixth.done()
        sixth.cancel()
