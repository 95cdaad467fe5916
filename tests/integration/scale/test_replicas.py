"""Every service as several processes at once, on the PostgreSQL ledger: 3 reconcilers,
2 writers, 2 dynamics-pollers and an ec-poller (``prefsync run`` each), a mixed workload of
edits on both sides with conflicts, and a reconciler and a writer killed mid-run.

Done when: both sides end with the last-writer-wins answer for every edited key, each key's
ledger history never goes backwards, and the killed replicas' shards are taken over.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.domain import SIDES
from common.messaging.topology import Topology
from common.store import LedgerStore, open_store
from services.runtime.assignment import MEMBER_TTL_S, group_name, holders
from tests.harness.waiting import until

from ..pipeline.conftest import World, make_worlds
from ..store.backends import postgres_schema

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

RECONCILERS = ("rec-1", "rec-2", "rec-3")
WRITERS = ("wri-1", "wri-2")
SHARDS = 4


@dataclass(frozen=True)
class Edit:
    email: str
    preference_id: int
    dynamics: bool | None     # the value set in Dynamics this round (None: not edited there)
    dotdigital: bool | None
    winner: str               # the side whose edit is the later one


async def holding(store: LedgerStore, world: World, service: str) -> dict[str, str]:
    return holders(await store.members(group_name(service, world.account)))


def queues_of(world: World, service: str) -> set[str]:
    if service == "reconciler":
        return {Topology.changes_queue(world.account, s) for s in range(SHARDS)}
    return {Topology.writes_queue(world.account, side, s) for side in SIDES for s in range(SHARDS)}


# what spread_over saw last, per service (for the failure message)
last_seen: dict[str, dict[str, str]] = {}


async def spread_over(store: LedgerStore, world: World, service: str,
                      replicas: set[str]) -> bool:
    owners = last_seen[service] = await holding(store, world, service)
    return set(owners) == queues_of(world, service) and set(owners.values()) == replicas


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with postgres_schema() as url, \
            make_worlds(tmp_path, records=60, preferences=3, shards=SHARDS,
                        store_url=url) as worlds:
        yield worlds[0]


async def edit_round(world: World, round_no: int, people: range) -> list[Edit]:
    """Edits on one side, the other, or both (conflicts: the later side by its own clock is
    five seconds ahead; clocks only move forward between rounds)."""
    base = 20 * round_no
    edits: list[Edit] = []
    for i in people:
        person = world.people[i]
        preference = world.preferences[(i + round_no) % len(world.preferences)]
        kind = (i + round_no) % 4
        value = bool((i * 7 + round_no) % 2)
        if kind in (0, 1):
            edits.append(Edit(person.email, preference.id, value if kind == 0 else None,
                              value if kind == 1 else None, "dynamics" if kind == 0 else "dotdigital"))
        else:
            winner = "dotdigital" if kind == 2 else "dynamics"
            edits.append(Edit(person.email, preference.id, value if winner == "dynamics" else not value,
                              value if winner == "dotdigital" else not value, winner))
    # dynamics edits first, then dotdigital's, each side's clock set for the round
    for side in ("dynamics", "dotdigital"):
        for edit in edits:
            target = edit.dynamics if side == "dynamics" else edit.dotdigital
            if target is None:
                continue
            ahead = 5 if (edit.dynamics is not None and edit.dotdigital is not None
                          and edit.winner == side) else 0
            await world.set_clock(side, {"offset_s": base + ahead})
            if side == "dynamics":
                await world.edit_dynamics(edit.email, edit.preference_id, target)
            else:
                await world.edit_dotdigital(edit.email, edit.preference_id, target)
    return edits


def explain(world: World) -> str:
    return f"holders: {last_seen}\n{world.report()}"


def expected(rounds: list[list[Edit]]) -> dict[tuple[str, int], bool]:
    answer: dict[tuple[str, int], bool] = {}
    for edits in rounds:
        for edit in edits:
            value = edit.dynamics if edit.winner == "dynamics" else edit.dotdigital
            assert value is not None
            answer[(edit.email, edit.preference_id)] = value
    return answer


async def test_replicas_share_the_work_and_survive_a_kill(world: World) -> None:
    for name in RECONCILERS:
        await world.spawn("reconciler", replica=name)
    for name in WRITERS:
        await world.spawn("writer", replica=name)
    await world.spawn("dynamics-poller", replica="dyn-1")
    await world.spawn("dynamics-poller", replica="dyn-2")
    await world.spawn("ec-poller", replica="ec-1")
    async with open_store(world.config.store.url) as store:
        await until(lambda: spread_over(store, world, "reconciler", set(RECONCILERS)), timeout_s=60,
                    every=0.02, what=lambda: explain(world))
        await until(lambda: spread_over(store, world, "writer", set(WRITERS)), timeout_s=60,
                    every=0.02, what=lambda: explain(world))

        first = await world.sync(timeout_s=180)
        assert first["failed"] == 0, first
        rounds = [await edit_round(world, 1, range(24))]
        summary = await world.sync(timeout_s=180)
        assert summary["failed"] == 0, summary

        # round 2, with a reconciler and a writer killed while the run is under way
        rounds.append(await edit_round(world, 2, range(12, 36)))
        await world.faults("dotdigital", {"latency_ms": {"GET /v2/contacts/with-preference": 300}})
        before = (await world.stats("dotdigital"))["calls"]
        run = asyncio.create_task(world.sync(timeout_s=240))
        owners = await holding(store, world, "reconciler")
        victim_queues = {q for q, m in owners.items() if m == "rec-2"}

        async def reading_feeds() -> bool:
            """The run is under way: dotdigital answered one of its feed reads."""
            calls = (await world.stats("dotdigital"))["calls"]
            return any(count > before.get(route, 0) for route, count in calls.items()
                       if "with-preference" in route)

        await until(reading_feeds, timeout_s=60, every=0.02, what=lambda: explain(world))
        killed_at = time.monotonic()
        for victim in ("rec-2", "wri-1"):
            world.processes[victim].send_signal(signal.SIGKILL)
        await until(lambda: spread_over(store, world, "reconciler", {"rec-1", "rec-3"}), timeout_s=60,
                    every=0.02, what=lambda: explain(world))
        reconciler_handover_s = time.monotonic() - killed_at
        await until(lambda: spread_over(store, world, "writer", {"wri-2"}), timeout_s=60,
                    every=0.02, what=lambda: explain(world))
        writer_handover_s = time.monotonic() - killed_at
        summary = await run
        assert summary["failed"] == 0, summary
        await world.faults("dotdigital", None)

        # one more run reads back what the last one wrote
        summary = await world.sync(timeout_s=180)
        assert summary["failed"] == 0, summary

        answer = expected(rounds)
        for (email, preference_id), value in answer.items():
            assert await world.values(email, preference_id) == ({value}, value), (
                email, preference_id)
        for email in {email for email, _ in answer}:
            history = await store.history(world.account, email)
            for preference in world.preferences:
                applied = [h.origin_time.replace(microsecond=0) for h in history
                           if h.preference_id == preference.id
                           and h.decision in ("applied", "tie_opt_out_won")]
                assert applied == sorted(applied), (email, preference.id, applied)
    assert victim_queues
    print(f"hand-over after a kill: reconciler shards {reconciler_handover_s:.1f} s, writer "
          f"shards {writer_handover_s:.1f} s (membership TTL {MEMBER_TTL_S} s)")
