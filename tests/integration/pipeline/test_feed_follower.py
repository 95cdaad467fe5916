"""The writer's incremental read of dotdigital's opt-ins-since feed (common.vendors.dotdigital.feed).

A user change read while writing one batch must still be seen by a later batch for its key; this
process's own writes must not pile up; each read asks only for what is new.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime

import pytest

from common.messaging.topology import shard_of
from common.vendors.dotdigital.client import DotdigitalClient
from common.vendors.dotdigital.feed import FeedFollower
from common.vendors.dotdigital.models import OptInEntry
from services.simulators import seeding
from tests.unit.vendors.support import DD_ACCOUNT, SimControl, dotdigital_config, dotdigital_sim

pytestmark = pytest.mark.anyio

SEED = 5


@asynccontextmanager
async def seeded() -> AsyncIterator[tuple[SimControl, DotdigitalClient, list[str], int]]:
    async with dotdigital_sim() as sim:
        await sim.call("POST", "seed", {"records": 20, "preferences": 1, "seed": SEED,
                                        "account": DD_ACCOUNT, "states": "none"})
        async with DotdigitalClient(config=dotdigital_config(sim.url)) as client:
            emails = [p.email for p in seeding.people(20, SEED)]
            preference = seeding.leaf_preferences(1, SEED)[0].id
            yield sim, client, emails, preference


async def user_sets(sim: SimControl, email: str, preference: int, opted_in: bool) -> None:
    await sim.call("POST", "dotdigital/edit", {"account": DD_ACCOUNT, "email": email,
                                               "preferences": {str(preference): opted_in}})


async def we_write(client: DotdigitalClient, follower: FeedFollower, email: str,
                   preference: int, opted_in: bool) -> datetime:
    write = follower.writing(started=await client.server_time(),
                             values={email: {preference: opted_in}})
    await client.update_contact_preferences(email, {preference: opted_in})
    ended = await client.server_time()
    follower.written(write, ended=ended)
    return ended


async def clock_moves_on(sim: SimControl, client: DotdigitalClient) -> datetime:
    """Move dotdigital's clock on, so every time read from now on is later than every change so
    far (the feed is inclusive, and a read starts at a time taken from a ``Date`` header, whole
    seconds less a second: a read that starts before a change returns it again, which these
    tests do not want to depend on)."""
    clock = await sim.call("GET", "clock")
    await sim.clock(offset_s=clock["offset_s"] + 3)
    return await client.server_time()


def reads_asked(client: DotdigitalClient) -> list[datetime]:
    """Where each of the client's feed reads starts from, from now on."""
    asked: list[datetime] = []
    feed = client.iter_opt_in_entries

    def recording(preference_id: int, since: datetime, *,
                  wanted: Callable[[str], bool] | None = None
                  ) -> AsyncIterator[list[OptInEntry]]:
        asked.append(since)
        return feed(preference_id, since, wanted=wanted)

    client.iter_opt_in_entries = recording  # type: ignore[method-assign]
    return asked


def values(found: dict[str, list[tuple[int, bool, datetime]]]) -> dict[str, list[bool]]:
    return {email: [opted_in for _, opted_in, _ in entries] for email, entries in found.items()}


async def test_a_user_change_read_for_one_batch_is_kept_for_a_later_one() -> None:
    async with seeded() as (sim, client, emails, preference):
        a, b, c = emails[:3]
        follower = FeedFollower(client=client)
        watermark = await client.server_time()
        await user_sets(sim, a, preference, False)

        first = await follower.entries(preference, since=watermark, emails={b})
        await we_write(client, follower, c, preference, True)
        await clock_moves_on(sim, client)
        second = await follower.entries(preference, since=watermark, emails={a, c})
        third = await follower.entries(preference, since=watermark, emails={a, c})

        assert first == {}
        assert values(second) == {a: [False], c: [True]}
        # our own write is not kept; the user's change is, as long as the watermark stands
        assert values(third) == {a: [False]}


async def test_each_read_starts_at_a_time_seen_before_it_began() -> None:
    async with seeded() as (sim, client, emails, preference):
        follower = FeedFollower(client=client)
        asked = reads_asked(client)
        watermark = await client.server_time()
        for email in emails[:10]:
            ended = await we_write(client, follower, email, preference, True)
        await clock_moves_on(sim, client)
        before_first = await client.server_time()
        await follower.entries(preference, since=watermark, emails=set(emails[:10]))
        await user_sets(sim, emails[11], preference, False)

        found = await follower.entries(preference, since=watermark, emails={emails[11]})

        # the first read from the watermark; the second from a time before the first read
        # began, after our ten writes: they are not read (nor kept) again
        assert asked[0] == watermark
        assert ended < asked[1] <= before_first
        assert values(found) == {emails[11]: [False]}


async def test_a_moved_watermark_starts_afresh() -> None:
    async with seeded() as (sim, client, emails, preference):
        a = emails[0]
        follower = FeedFollower(client=client)
        watermark = await client.server_time()
        await user_sets(sim, a, preference, True)
        await follower.entries(preference, since=watermark, emails=set())

        later = await clock_moves_on(sim, client)
        found = await follower.entries(preference, since=later, emails={a})

        assert found == {}


async def test_a_watermark_moved_on_within_what_was_read_keeps_what_is_newer() -> None:
    async with seeded() as (sim, client, emails, preference):
        a, b = emails[:2]
        follower = FeedFollower(client=client)
        asked = reads_asked(client)
        watermark = await client.server_time()
        await user_sets(sim, a, preference, False)
        moved = await clock_moves_on(sim, client)
        await user_sets(sim, b, preference, True)
        await clock_moves_on(sim, client)
        first = await follower.entries(preference, since=watermark, emails={a, b})

        found = await follower.entries(preference, since=moved, emails={a, b})

        assert values(first) == {a: [False], b: [True]}
        # a's change is before the new watermark: gone; b's is kept, and the read goes on from
        # where the first one ended instead of from the new watermark
        assert values(found) == {b: [True]}
        assert asked[0] == watermark and asked[1] > moved


async def test_keeping_too_much_falls_back_to_reading_from_the_watermark() -> None:
    async with seeded() as (sim, client, emails, preference):
        follower = FeedFollower(client=client, max_kept=2)
        watermark = await client.server_time()
        for email in emails[:3]:
            await user_sets(sim, email, preference, True)
        await follower.entries(preference, since=watermark, emails=set())

        found = await follower.entries(preference, since=watermark, emails={emails[0]})

        assert values(found) == {emails[0]: [True]}


def two_shards(emails: list[str]) -> tuple[str, str]:
    """An email of shard 0 and one of shard 1 (of 2)."""
    first = next(e for e in emails if shard_of(e, 2) == 0)
    second = next(e for e in emails if shard_of(e, 2) == 1)
    return first, second


async def test_a_replica_keeps_its_shards_entries_and_reads_again_for_a_shard_it_takes() -> None:
    async with seeded() as (sim, client, emails, preference):
        a, b = two_shards(emails)
        held = {0}
        follower = FeedFollower(client=client, shards=2, held=lambda: held)
        asked = reads_asked(client)
        watermark = await client.server_time()
        await user_sets(sim, a, preference, False)
        await user_sets(sim, b, preference, True)
        await clock_moves_on(sim, client)
        first = await follower.entries(preference, since=watermark, emails=set())
        kept = await follower.entries(preference, since=watermark, emails={a})

        held = {0, 1}  # shard 1 taken over: b's change was passed over, not kept
        taken = await follower.entries(preference, since=watermark, emails={b})

        assert first == {}
        assert values(kept) == {a: [False]}
        assert values(taken) == {b: [True]}
        # the second read went on from the first; the third started again from the watermark
        assert asked[0] == watermark and asked[1] > watermark and asked[2] == watermark


async def read_for_shard_0(sim: SimControl, client: DotdigitalClient, emails: list[str],
                           preference: int, *, held: set[int]
                           ) -> tuple[FeedFollower, list[datetime], datetime, str]:
    """A follower holding ``held`` of 2 shards; an email of shard 1 set to False by its user,
    then a read for an email of shard 0. Returns the follower, its reads' starts, the
    watermark and that email of shard 1."""
    a, b = two_shards(emails)
    follower = FeedFollower(client=client, shards=2, held=lambda: held)
    asked = reads_asked(client)
    watermark = await client.server_time()
    await user_sets(sim, b, preference, False)
    await clock_moves_on(sim, client)
    await follower.entries(preference, since=watermark, emails={a})
    return follower, asked, watermark, b


async def test_a_batch_of_a_shard_just_handed_over_is_read_from_the_watermark() -> None:
    async with seeded() as (sim, client, emails, preference):
        follower, asked, watermark, b = await read_for_shard_0(sim, client, emails, preference,
                                                               held={0})

        found = await follower.entries(preference, since=watermark, emails={b})
        again = await follower.entries(preference, since=watermark, emails={b})

        assert values(found) == {b: [False]} and values(again) == {b: [False]}
        # started again once, from the watermark, with b's shard in what it keeps
        assert asked[1] == watermark and asked[2] > watermark


async def test_a_replica_holding_every_shard_keeps_every_entry() -> None:
    async with seeded() as (sim, client, emails, preference):
        follower, asked, watermark, b = await read_for_shard_0(sim, client, emails, preference,
                                                               held={0, 1})

        found = await follower.entries(preference, since=watermark, emails={b})

        assert values(found) == {b: [False]}
        assert asked[1] > watermark  # what it kept covered b: no read from the watermark
