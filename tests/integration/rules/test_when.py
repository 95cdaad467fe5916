"""When: schedules that change without a restart, sync now, the status of each account, and
triggers during a run coalesced into the next run."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from common.messaging.topology import CONTROL_EXCHANGE
from common.store import open_store
from services.cli.schedule import schedule_command
from services.cli.sync_now import request_sync
from tests.harness.waiting import until

from ..pipeline.conftest import BROKER_URL, World, make_world
from .conftest import status, synced

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def state_is(world: World, wanted: str) -> bool:
    return bool((await status(world))["state"] == wanted)


@asynccontextmanager
async def progress(world: World) -> AsyncIterator[list[dict[str, Any]]]:
    """Every progress event of the account, as it arrives."""
    events: list[dict[str, Any]] = []
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(CONTROL_EXCHANGE)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key=f"{world.account}.progress.#")

        async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            events.append(orjson.loads(message.body))
            await message.ack()

        await queue.consume(on_event)
        yield events


def started_run(events: list[dict[str, Any]], trigger: str) -> str | None:
    """The run that took ``trigger`` (the dynamics-poller's run-started for it)."""
    for event in events:
        if (event.get("event") == "run-started" and event.get("run_id") == trigger
                and event.get("service") == "dynamics-poller"):
            return str(event["run"])
    return None


async def test_status_goes_from_none_to_queued_to_synchronising_to_synchronised(
        tmp_path: Path) -> None:
    async with make_world(tmp_path) as world:
        await world.start()
        assert (await status(world))["state"] == "None"
        async with open_store(world.config.store.url) as store:
            # another replica holds the poller's lease: the trigger waits in the queue
            lease = f"{world.account}:dynamics-poller"
            assert await store.acquire_lease(lease, "another-replica", 60)
            await request_sync(config=world.config, account=world.account)
            await until(lambda: state_is(world, "Added to queue"), timeout_s=30, every=0.02,
                        what="status Added to queue")
            await world.faults("dynamics", {"latency_ms": {"GET /api/data": 400}})
            await store.release_lease(lease, "another-replica")
            await until(lambda: state_is(world, "Synchronising"), timeout_s=30, every=0.02,
                        what="status Synchronising")
            await world.faults("dynamics", None)
            await until(lambda: state_is(world, "Synchronised"), timeout_s=120, every=0.02,
                        what="status Synchronised")
        shown = await status(world)
        assert shown["last_success_at"] and shown["next_run_at"] is None
        counts = shown["last_run"]["counts"]
        assert counts["read_dynamics"] > 0 and counts["read_dotdigital"] > 0
        assert counts["failed"] == 0


async def test_a_schedule_change_takes_effect_without_a_restart(tmp_path: Path) -> None:
    async with make_world(tmp_path) as world:
        await world.start()
        first = (await synced(world))["run"]
        out = io.StringIO()
        assert await schedule_command(config=world.config, account=world.account,
                                      text="every 1s", clear=False, out=out) == 0
        assert "every 1s" in out.getvalue()

        async def scheduled_run_finished() -> bool:
            last = (await status(world))["last_run"]
            return last is not None and last["run"] != first

        await until(scheduled_run_finished, timeout_s=120, every=0.02,
                    what="a scheduled run finished")
        assert (await status(world))["schedule"] == "every 1s"
        out = io.StringIO()
        assert await schedule_command(config=world.config, account=world.account, text=None,
                                      clear=True, out=out) == 0
        assert "manual (from the config)" in out.getvalue()
        shown = await status(world)
        assert shown["schedule"] == "manual" and shown["next_run_at"] is None
        bad = io.StringIO()
        assert await schedule_command(config=world.config, account=world.account,
                                      text="hourly", clear=False, out=bad) == 2


async def test_a_trigger_during_a_run_is_coalesced_into_the_next_run(tmp_path: Path) -> None:
    async with make_world(tmp_path) as world:
        await world.start()
        await synced(world)
        async with progress(world) as events:
            await world.faults("dynamics", {"latency_ms": {"GET /api/data": 300}})
            first = await request_sync(config=world.config, account=world.account)
            await until(lambda: started_run(events, first) is not None, timeout_s=30, every=0.02,
                        what="the first run started")
            # two more triggers while the first run is still reading Dynamics
            second = await request_sync(config=world.config, account=world.account)
            third = await request_sync(config=world.config, account=world.account)
            await world.faults("dynamics", None)
            await until(lambda: None not in (started_run(events, second),
                                             started_run(events, third)),
                        timeout_s=120, every=0.02, what="the later triggers' run started")
        # Neither was lost, and both were taken by one run after the first.
        assert started_run(events, second) == started_run(events, third) != started_run(
            events, first)
        next_run = started_run(events, second)

        async def finished() -> bool:
            last = (await status(world))["last_run"]
            return last is not None and last["run"] == next_run

        await until(finished, timeout_s=120, every=0.02, what="the next run finished")
