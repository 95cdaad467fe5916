"""The pollers under faults: a run that fails or dies leaves its work to the next run, the read
markers owed at a crash are published, and a feed entry that became visible late is read.

Every service runs as its own ``prefsync run`` process where a failpoint kills one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from common.config import parse_config
from common.domain import KeyState, Known, PreferenceKey
from common.runs import RunTracker
from common.store import open_store
from common.vendors.dotdigital.feed import feed_position
from common.vendors.dotdigital.models import FeedPage
from services.cli.sync_now import _trigger
from services.ec_poller import service as ec_poller
from services.ec_poller.service import (
    EcPoller,
    Seen,
    leaf_preference_ids,
    opt_in_change_id,
    page_read,
)
from tests.harness.waiting import until

from ..rules.conftest import Vendors, synced, vendors
from .conftest import World, make_world

pytestmark = pytest.mark.anyio


async def sync_through_a_crash(world: World, service: str, failpoint: str) -> None:
    """A sync during which ``service`` (started again if it runs) dies at ``failpoint``; it is
    started again and the run, left pending, is taken up by the new process."""
    process = world.processes.get(service)
    if process is not None and process.returncode is None:
        process.kill()
        await process.wait()
    await world.spawn(service, failpoints=failpoint)
    run = asyncio.create_task(world.sync(timeout_s=180))
    assert await asyncio.wait_for(world.processes[service].wait(), timeout=120) == 137
    await world.spawn(service)
    await run


async def until_values(world: World, email: str, preference_id: int, wanted: bool,
                       timeout_s: float = 90) -> None:
    """Polls both vendors (another process does the work) until they hold ``wanted``."""
    async def holding() -> bool:
        return await world.values(email, preference_id) == ({wanted}, wanted)

    await until(holding, timeout_s=timeout_s, every=0.5,
                what=f"both vendors hold {wanted} for {email}")


async def tracked_sync(world: World) -> RunTracker:
    trackers: dict[str, RunTracker] = {}
    await _trigger(config=world.config, account=world.account, follow=(trackers, 120))
    return trackers["run"]


async def an_entry_listed_late(world: World) -> tuple[str, int, bool]:
    """After a sync, a dotdigital edit stamped before its read began (3 s: the read's start on
    dotdigital's clock, from an answer's whole-second Date less a second, may be up to 2 s
    early), after every earlier change, visible only now: as a write dotdigital was still
    committing when the read ran. Read by the next read of the overlap, which the next run
    makes: as if the last one was twice the overlap ago (runs closer together read from where
    the previous one began). Returns the key and the value edited."""
    read_from = time.monotonic()  # the next read starts after this
    await synced(world)
    person, preference = world.people[0], world.preferences[0]
    _, before = await world.values(person.email, preference.id)
    wanted = not before if before is not None else False
    await world.edit_dotdigital(person.email, preference.id, wanted,
                                stamped_ago_s=time.monotonic() - read_from + 3.0)
    overlap_s = world.config.account(world.account).dotdigital.feed_overlap_s
    await world.age_full_feed_read(preference.id, 2 * overlap_s)
    return person.email, preference.id, wanted


@asynccontextmanager
async def synced_world(tmp_path: Path) -> AsyncIterator[tuple[World, Vendors]]:
    """A world with every service as a process of its own, synced once; and its vendors."""
    async with make_world(tmp_path) as world, vendors(world) as org:
        await world.spawn_all()
        await synced(world)
        yield world, org


@pytest.mark.slow
async def test_newly_eligible_record_is_followed_up_after_a_crash(tmp_path: Path) -> None:
    async with synced_world(tmp_path) as (world, org):
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
        await sync_through_a_crash(world, "dynamics-poller",
                                   "dynamics-poller.after-mark-eligible")
        await synced(world)
        assert await world.values(email, from_dynamics.id) == ({True}, True)
        assert await world.values(email, from_dotdigital.id) == ({False}, False)


@pytest.mark.slow
async def test_a_failed_run_is_retried_without_a_new_trigger(tmp_path: Path) -> None:
    async with synced_world(tmp_path) as (world, _):
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


@pytest.mark.slow
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
        await sync_through_a_crash(world, "ec-poller", "ec-poller.after-checkpoint")
        await synced(world)
        assert await world.values(email, first) == ({True}, True)


@pytest.mark.slow
async def test_a_feed_entry_visible_late_is_read(tmp_path: Path) -> None:
    async with make_world(tmp_path) as world:
        await world.start()
        await synced(world)
        email, preference_id, wanted = await an_entry_listed_late(world)
        await synced(world)
        assert await world.values(email, preference_id) == ({wanted}, wanted)
        # The next run reads from where that one began: what was published is not published
        # again.
        quiet = await tracked_sync(world)
        assert not quiet.failures, quiet.failures
        assert quiet.pollers_done["dotdigital"]["published"] == 0, quiet.pollers_done
        assert quiet.pollers_done["dotdigital"]["statuses"] == 0, quiet.pollers_done


@pytest.mark.slow
async def test_an_overlap_read_killed_after_a_page_delivers_what_it_read(tmp_path: Path) -> None:
    """The ec-poller dies after an overlap read published its page (the failpoint
    ``ec-poller.after-page``): what that page held, an entry dotdigital listed late, reaches
    Dynamics; the read resumed by the next process starts where the killed one started, and,
    being resumed, does not count as a full read (what it did not read since the crash may have
    been listed late too), so the next run reads the overlap again."""
    async with make_world(tmp_path) as world:
        await world.spawn_all()
        await synced(world)
        await synced(world)  # (its echoes read: the feeds hold nothing newer)
        # the one entry of any feed that the next run reads
        email, preference_id, wanted = await an_entry_listed_late(world)
        checkpoint = feed_position(preference_id)
        async with open_store(world.config.store.url) as store:
            aged = await checkpoint.get(store, world.account)
        assert aged is not None and aged.covered is not None

        process = world.processes["ec-poller"]
        process.kill()
        await process.wait()
        await world.spawn("ec-poller", failpoints="ec-poller.after-page")
        run = asyncio.create_task(world.sync(timeout_s=180))
        assert await asyncio.wait_for(world.processes["ec-poller"].wait(), timeout=120) == 137
        async with open_store(world.config.store.url) as store:
            killed = await checkpoint.get(store, world.account)
        # it died in the overlap read (from what was surely read), past its first page
        assert killed is not None and killed.min_contact_id is not None
        assert killed.reading_from == aged.covered and killed.covered == aged.covered
        await world.spawn("ec-poller")
        await run  # taken up by the new process: the read resumed
        async with open_store(world.config.store.url) as store:
            resumed = await checkpoint.get(store, world.account)
        assert resumed is not None and resumed.min_contact_id is None
        assert resumed.covered == aged.covered  # a resumed read is not a full one
        await synced(world)
        assert await world.values(email, preference_id) == ({wanted}, wanted)
        async with open_store(world.config.store.url) as store:
            again = await checkpoint.get(store, world.account)
        # so the next run read the overlap again, in full
        assert again is not None and again.covered is not None and again.covered > aged.covered


async def test_an_overlap_beyond_the_kept_ids_is_checked_against_the_ledger(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ec_poller, "SEEN_LIMIT", 1)
    config = parse_config({
        "broker": {"url": "amqp://127.0.0.1:1/"},
        "store": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
        "accounts": [{
            "id": "acme",
            "dynamics": {"url": "http://127.0.0.1:1", "token_url": "http://127.0.0.1:1/t",
                         "client_id": "c", "client_secret_env": "S"},
            "dotdigital": {"url": "http://127.0.0.1:1", "api_user": "u", "password_env": "S"},
        }]}, env={"S": "x"})
    start = datetime(2026, 1, 1, tzinfo=UTC)
    page = FeedPage(contact_ids=[0, 1, 2], emails=[f"p{n}@example.com" for n in range(3)],
                    statuses=["Subscribed"] * 3, owners=[0, 1, 2], opted_in=[True] * 3,
                    modified=[start + timedelta(seconds=n) for n in range(3)],
                    modified_iso=[(start + timedelta(seconds=n)).isoformat() for n in range(3)],
                    last_id=2)
    read = page_read(page, 7)
    assert read.change_ids == [opt_in_change_id(n, 7, page.modified[n]) for n in range(3)]
    none: Any = None  # the vendor client and the broker are not used here
    async with open_store(config.store.url) as store:
        poller = EcPoller(account=config.accounts[0], client=none, store=store, publisher=none,
                          shards=1)
        seen = Seen(keep_from=start)
        assert list(await poller._unseen(read, set(), seen, unkept=None)) == [0, 1, 2]
        kept = seen.stored()  # the newest change id only, and from when older ones are left out
        assert len(kept["seen"]) == 1 and kept["seen_from"] == page.modified[2].isoformat()
        # The reconciler has read p0's change (the ledger knows it, with the clock offset it
        # was placed with); of p1 it knows only an older opt-out, not this change.
        key = PreferenceKey(account="acme", email="p0@example.com", preference_id=7)
        older = PreferenceKey(account="acme", email="p1@example.com", preference_id=7)
        await store.save([
            (None, KeyState(key=key).with_known(
                "dotdigital", Known(opted_in=True, as_of=start,
                                    offset=timedelta(milliseconds=-37))), None),
            (None, KeyState(key=older).with_known(
                "dotdigital", Known(opted_in=False, as_of=start)), None)])
        again = await poller._unseen(read, set(kept["seen"]), Seen(keep_from=start),
                                     unkept=datetime.fromisoformat(kept["seen_from"]))
        assert again == [1]


@pytest.mark.slow
async def test_an_email_change_seen_before_a_crash_is_still_followed(tmp_path: Path) -> None:
    async with synced_world(tmp_path) as (world, org):
        # A contact moves to an email dotdigital knows with other values; in the same run a
        # record joins a list, and the poller dies once it is marked (after the directory read
        # that saw the move: the directory's cursor is past it).
        # The new email has a record of its own already, in step with dotdigital: only the
        # moved record differs, and only the move tells it does.
        new_email = "moved.before.crash@example.com"
        person = next(p for p in world.people[10:] if p.kind == "contact")
        (record, values), = (await org.record_values(person.email)).items()
        theirs = {p.id: not values.get(p.id, False) for p in world.preferences}
        await org.dotdigital.patch_contact_v3(new_email, preferences=theirs)
        own = await org.create_record("contact", new_email)
        await org.add_to_list("contact", own)
        for preference_id, value in theirs.items():
            await org.subscribe("contact", own, preference_id, value)
        await synced(world)
        await world.set_clock("dynamics", {"offset_s": 3})  # the move after those values
        await org.set_record("contact", record, {"emailaddress1": new_email})
        await world.set_clock("dynamics", {})
        joiner = await org.create_record("contact", "joins.now@example.com")
        await org.add_to_list("contact", joiner)
        await sync_through_a_crash(world, "dynamics-poller",
                                   "dynamics-poller.after-mark-eligible")
        await synced(world)
        # the record got the new email's values: the move was followed after the crash
        assert (await org.record_values(new_email))[record] == theirs
        assert await world.dotdigital_values(new_email) == theirs
