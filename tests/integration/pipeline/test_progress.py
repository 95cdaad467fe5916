"""Progress of long commands: drawn on a terminal, never into a pipe."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from typing import Any

import aio_pika
import orjson
import pytest

from common.messaging.topology import CONTROL_EXCHANGE

from .conftest import World

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def sync_now_output(world: World, *, terminal: bool) -> str:
    """What ``prefsync sync-now --wait`` writes to its stdout: a pseudo-terminal or a pipe."""
    command = (sys.executable, "-m", "services.cli", "sync-now", world.account, "--wait",
               "--config", str(world.config_path))
    env = {**os.environ, **world.env, "PREFSYNC_LOG_LEVEL": "WARNING", "COLUMNS": "160"}
    if not terminal:
        process = await asyncio.create_subprocess_exec(
            *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(process.communicate(), timeout=120)
        assert process.returncode == 0, out
        return out.decode()
    import pty

    master, slave = pty.openpty()
    process = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=slave, stderr=asyncio.subprocess.DEVNULL)
    os.close(slave)

    def read_all() -> bytes:
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        out = await asyncio.wait_for(asyncio.to_thread(read_all), timeout=120)
        assert await process.wait() == 0, out
    finally:
        os.close(master)
    return out.decode(errors="replace")


async def test_sync_now_wait_shows_progress_on_a_terminal_only(world: World) -> None:
    await world.start()
    piped = await sync_now_output(world, terminal=False)
    assert piped.startswith(f"sync of {world.account} finished"), piped
    assert "\x1b" not in piped and "reconciled" not in piped and "left" not in piped

    on_terminal = await sync_now_output(world, terminal=True)
    # the live counters (erased once done), then the same summary
    assert "\x1b[" in on_terminal
    for counter in ("read", "reconciled", "written"):
        assert counter in on_terminal.replace("read:", ""), on_terminal
    assert f"sync of {world.account} finished" in on_terminal


async def test_sync_now_wait_finishes_when_the_ec_poller_coalesced_its_run(world: World) -> None:
    """Three syncs asked one after another while the ec-poller still reads for the first: the
    dynamics-poller runs each on its own, the ec-poller reads for the second and the third
    together, as one run. Every ``sync-now --wait`` must still finish (the third used to wait
    forever for a dotdigital read under its own name)."""
    connection = await aio_pika.connect(world.config.broker.url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(CONTROL_EXCHANGE, ensure=True)
        events = await channel.declare_queue(exclusive=True, auto_delete=True)
        await events.bind(exchange, routing_key=f"{world.account}.progress.#")
        seen: list[dict[str, Any]] = []
        arrived = asyncio.Condition()

        async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with arrived:
                seen.append(orjson.loads(message.body))
                arrived.notify_all()

        await events.consume(on_event, no_ack=True)

        async def until(what: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
            async with arrived:
                await asyncio.wait_for(arrived.wait_for(lambda: any(map(what, seen))), 60)
                return next(e for e in seen if what(e))

        # the ec-poller stalls after each feed it read: its runs last seconds
        await world.spawn("ec-poller", failpoints="ec-poller.after-checkpoint=sleep:4")
        await world.start(("dynamics-poller", "reconciler", "writer"))

        def started(service: str) -> Callable[[dict[str, Any]], bool]:
            return lambda e: e.get("event") == "run-started" and e.get("service") == service

        async def sync_now() -> tuple[str, asyncio.subprocess.Process]:
            """A ``sync-now --wait`` under way, and the dynamics-poller's run it was given."""
            before = {e.get("run") for e in seen if started("dynamics-poller")(e)}
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.cli", "sync-now", world.account, "--wait",
                "--timeout", "90", "--config", str(world.config_path),
                env={**os.environ, **world.env, "PREFSYNC_LOG_LEVEL": "WARNING"},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            run = (await until(lambda e: started("dynamics-poller")(e)
                               and e.get("run") not in before))["run"]
            await until(lambda e: e.get("event") == "poller-done"
                        and e.get("source") == "dynamics" and e.get("run_id") == run)
            return run, process

        first, first_process = await sync_now()
        await until(lambda e: started("ec-poller")(e) and e.get("run_id") == first)
        second, second_process = await sync_now()
        third, third_process = await sync_now()
        # the ec-poller is still in the first run: it reads for the other two in one run
        coalesced = await until(lambda e: started("ec-poller")(e) and e.get("run_id") == third)
        assert coalesced["run"] == second, (coalesced, "the ec-poller did not coalesce the runs")
        for process in (first_process, second_process, third_process):
            out, _ = await asyncio.wait_for(process.communicate(), timeout=120)
            assert process.returncode == 0, out.decode()
            assert b"finished" in out, out.decode()
