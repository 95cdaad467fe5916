"""The pollers under faults: a run that fails or dies leaves its work to the next run, the read
markers owed at a crash are published, and a feed entry that became visible late is read.

Every service runs as its own ``prefsync run`` process where a failpoint kills one.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.ec_poller import leaf_preference_ids
from services.sync_now import RunTracker, _trigger

from ..rules.conftest import synced, vendors
from .conftest import ALL_SERVICES, World, make_world

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def restart(world: World, service: str, *, failpoints: str = "") -> None:
    process = world.processes[service]
    if process.returncode is None:
        process.kill()
        await process.wait()
    await world.spawn(service, failpoints=failpoints)


async def dies_at_failpoint(world: World, service: str) -> None:
    assert await asyncio.wait_for(world.processes[service].wait(), timeout=120) == 137


async def until_values(world: World, email: str, preference_id: int, wanted: bool,
                       timeout_s: float = 90) -> None:
    """Polls both vendors (another process does the work) until they hold ``wanted``."""
    async with asyncio.timeout(timeout_s):
        while await world.values(email, preference_id) != ({wanted}, wanted):
            await asyncio.sleep(0.5)


async def tracked_sync(world: World) -> RunTracker:
    trackers: dict[str, RunTracker] = {}
    await _trigger(config=world.config, account=world.account, follow=(trackers, 120))
    return trackers["run"]


async def test_newly_eligible_record_is_followed_up_after_a_crash(tmp_path: Path) -> None:
    async with make_world(tmp_path) as world, vendors(world) as org:
        for service in ALL_SERVICES:
            await world.spawn(service)
        await synced(world)
        # A record in no email-activated list, with a preference set on each side: both read,
        # neither synced.
        email = "late-joiner@example.com"
        from_dynamics, from_dotdigital = world.preferences[0], world.preferences[1]
        await org.dotdigital.patch_contact_v3(email, preferences={from_dotdigital.id: False})
        contact = await org.create_record("contact", email)
        await org.subscribe("contact", contact, from_dynamics.id, True)
        await synced(world)
        assert await world.values(email, from_dynamics.id) == ({True}, None)
        assert await world.values(email, from_dotdigital.id) == ({None}, False)

        # It joins a list; the poller dies as soon as it is marked eligible.
        await org.add_to_list("contact", contact)
        await restart(world, "dynamics-poller",
                      failpoints="dynamics-poller.after-mark-eligible")
        run = asyncio.create_task(world.sync(timeout_s=180))
        await dies_at_failpoint(world, "dynamics-poller")
        await world.spawn("dynamics-poller")
        await run  # the run left pending, taken up by the new process
        await synced(world)
        assert await world.values(email, from_dynamics.id) == ({True}, True)
        assert await world.values(email, from_dotdigital.id) == ({False}, False)


async def test_a_failed_run_is_retried_without_a_new_trigger(tmp_path: Path) -> None:
    async with make_world(tmp_path) as world:
        for service in ALL_SERVICES:
            await world.spawn(service)
        await synced(world)
        person, preference = world.people[0], world.preferences[0]
        _, before = await world.values(person.email, preference.id)
        wanted = not before if before is not None else True
        await world.set_clock("dynamics", {"offset_s": 2})
        await world.edit_dynamics(person.email, preference.id, wanted)
        await world.faults("dynamics", {"error_rate": {
            "GET /api/data/v9.2/psync_marketingpreferencesubscriptions": 1.0}})
        summary = await world.sync()
        assert summary["failed"] >= 1, summary
        assert any(e.startswith("dynamics-poller:") for e in summary["errors"]), summary
        await world.faults("dynamics", None)
        # Under the default manual schedule nothing else triggers a run: the failed run, still
        # pending, is run again once its backoff is over.
        await until_values(world, person.email, preference.id, wanted)


async def test_read_markers_owed_at_a_crash_are_published(tmp_path: Path) -> None:
    async with make_world(tmp_path) as world, vendors(world) as org:
        # A person whose first preference (the first feed read) is not set in dotdigital: the
        # write of its Dynamics value there waits for a complete read of that preference's
        # feed (its read markers).
        email = "first-read@example.com"
        first, *others = leaf_preference_ids(await org.dotdigital.preferences())
        await org.dotdigital.patch_contact_v3(email, preferences=dict.fromkeys(others, True))
        contact = await org.create_record("contact", email)
        await org.add_to_list("contact", contact)
        for preference in world.preferences:
            await org.subscribe("contact", contact, preference.id, True)
        for service in ("dynamics-poller", "reconciler", "writer"):
            await world.spawn(service)
        # The ec-poller dies after the first feed's end checkpoint, before its markers.
        await world.spawn("ec-poller", failpoints="ec-poller.after-checkpoint")
        run = asyncio.create_task(world.sync(timeout_s=180))
        await dies_at_failpoint(world, "ec-poller")
        await world.spawn("ec-poller")
        await run
        await synced(world)
        assert await world.values(email, first) == ({True}, True)


async def test_a_feed_entry_visible_late_is_read(tmp_path: Path) -> None:
    async with make_world(tmp_path) as world:
        await world.start()
        await synced(world)
        # dotdigital's clock runs two minutes ahead for this read (its start is the watermark)
        await world.set_clock("dotdigital", {"offset_s": 120})
        await synced(world)
        person, preference = world.people[0], world.preferences[0]
        _, before = await world.values(person.email, preference.id)
        wanted = not before if before is not None else False
        # An edit stamped before that read's start (but after every earlier change), visible
        # only now: as a write dotdigital was still committing when the read ran.
        await world.set_clock("dotdigital", {"offset_s": 2})
        await world.edit_dotdigital(person.email, preference.id, wanted)
        await world.set_clock("dotdigital", {"offset_s": 120})
        await synced(world)
        assert await world.values(person.email, preference.id) == ({wanted}, wanted)
        # The overlap is read again next time, but what was published is not published again.
        quiet = await tracked_sync(world)
        assert not quiet.failures, quiet.failures
        assert quiet.pollers_done["dotdigital"]["published"] == 0, quiet.pollers_done
        assert quiet.pollers_done["dotdigital"]["statuses"] == 0, quiet.pollers_done
