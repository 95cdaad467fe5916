"""The broker goes away under running services: every process survives and syncing resumes.

Each service runs as its own ``prefsync run`` process against a private RabbitMQ node (never
the machine's own broker), with a sync in flight (slow vendor writes keep batches in hand) when
the fault hits:

- the node is stopped for about 10 s and started again: ``/readyz`` of every process answers
  503 during the outage and 200 after it, no process exits (the same pids), and a sync after
  the broker's return lands every edit made before and during the outage, on both sides,
  within 60 s of the return;
- every client connection is closed by the broker (``close_all_connections``): the same.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import aio_pika
import aiohttp
import pytest

from common.messaging.topology import Topology
from tests.harness.private_services import PrivateRabbitMQ, free_port, private_rabbitmq
from tests.harness.unavailable import needs_rabbitmq_server
from tests.harness.waiting import until

from .conftest import ALL_SERVICES, World, make_world
from .test_crash import count_calls, wait_for_calls

pytestmark = [pytest.mark.anyio, pytest.mark.slow, needs_rabbitmq_server]

Edit = tuple[str, int, bool]
OUTAGE_S = 10.0
CONVERGE_S = 60.0


async def readiness(world: World, ports: dict[str, int]) -> dict[str, int]:
    """Each process's ``/readyz`` status (0: no answer)."""
    statuses = {}
    for service, port in ports.items():
        try:
            async with world.http.get(f"http://127.0.0.1:{port}/readyz",
                                      timeout=aiohttp.ClientTimeout(total=5)) as response:
                statuses[service] = response.status
        except (aiohttp.ClientError, TimeoutError):
            statuses[service] = 0
    return statuses


async def until_readiness(world: World, ports: dict[str, int], status: int,
                          timeout_s: float) -> None:
    statuses: dict[str, int] = {}

    async def everywhere() -> bool:
        nonlocal statuses
        if (statuses := await readiness(world, ports)) == dict.fromkeys(ports, status):
            return True
        for service, process in world.processes.items():
            assert process.returncode is None, f"{service} exited ({process.returncode})"
        return False

    await until(everywhere, timeout_s=timeout_s, every=0.2,
                what=lambda: f"/readyz is not {status} everywhere: {statuses}")


def assert_alive(world: World, pids: dict[str, int]) -> None:
    for service, process in world.processes.items():
        assert process.returncode is None, f"{service} exited ({process.returncode})"
        assert process.pid == pids[service]
    assert set(world.processes) == set(pids)


async def edit(world: World, start: int, count: int) -> list[Edit]:
    """Flip one preference of each of ``count`` people, on either side."""
    edits = []
    for i, person in enumerate(world.people[start:start + count], start=start):
        preference = world.preferences[i % len(world.preferences)]
        _, current = await world.values(person.email, preference.id)
        wanted = not current if current is not None else bool(i % 2)
        if i % 3 == 2:
            await world.edit_dotdigital(person.email, preference.id, wanted)
        else:
            await world.edit_dynamics(person.email, preference.id, wanted)
        edits.append((person.email, preference.id, wanted))
    return edits


async def converged(world: World, edits: list[Edit]) -> list[Edit]:
    """The edits that have not landed on both sides."""
    return [(email, preference_id, wanted) for email, preference_id, wanted in edits
            if await world.values(email, preference_id) != ({wanted}, wanted)]


async def dead_letters(node: PrivateRabbitMQ, account: str) -> int:
    connection = await aio_pika.connect(node.url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(Topology.dead_letter_queue(account), passive=True)
        return queue.declaration_result.message_count or 0


async def survive(tmp_path: Path, fault: Callable[[PrivateRabbitMQ, World, dict[str, int]],
                                                  Awaitable[list[Edit]]]) -> None:
    async with private_rabbitmq() as node, \
            make_world(tmp_path, broker_url=node.url) as world:
        ports = {service: free_port() for service in ALL_SERVICES}
        for service in ALL_SERVICES:
            await world.spawn(service, args=("--metrics-port", str(ports[service]),
                                             "--metrics-host", "127.0.0.1"))
        pids = {service: process.pid for service, process in world.processes.items()}
        await until_readiness(world, ports, 200, 60)
        assert (await world.sync())["failed"] == 0
        edits = await edit(world, 0, 12)
        # a sync in flight: slow vendor writes keep the writers' batches in hand
        await world.faults("dotdigital", {"latency_ms": {"PUT /contacts/v3/import": 800,
                                                         "PUT /v2/contacts": 800}})
        await world.faults("dynamics", {"latency_ms": {"POST /api/data/v9.2/$batch": 800}})
        before = await count_calls(world, "dotdigital", "PUT /")
        run = asyncio.create_task(world.sync(timeout_s=120))
        await wait_for_calls(world, "dotdigital", "PUT /", before)
        edits += await fault(node, world, ports)
        back = asyncio.get_running_loop().time()
        run.cancel()  # that sync followed a connection of its own, lost with the broker
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await run
        await world.faults("dotdigital", None)
        await world.faults("dynamics", None)
        assert_alive(world, pids)
        await until_readiness(world, ports, 200, CONVERGE_S)
        left = edits
        while left:
            remaining = back + CONVERGE_S - asyncio.get_running_loop().time()
            assert remaining > 0, f"not converged within {CONVERGE_S:g} s: {left}"
            with contextlib.suppress(Exception):  # a sync that times out is tried again
                await world.sync(timeout_s=remaining)
            left = await converged(world, left)
        assert_alive(world, pids)
        assert await dead_letters(node, world.account) == 0


async def test_every_service_survives_a_broker_restart(tmp_path: Path) -> None:
    async def restart(node: PrivateRabbitMQ, world: World, ports: dict[str, int]) -> list[Edit]:
        loop = asyncio.get_running_loop()
        await node.stop()
        stopped = loop.time()
        await until_readiness(world, ports, 503, OUTAGE_S)
        # edits made while the broker is away are read by the next sync
        during = await edit(world, 12, 8)
        # the outage itself lasts OUTAGE_S: time must pass, there is nothing to await
        await asyncio.sleep(max(0.0, stopped + OUTAGE_S - loop.time()))
        await node.start()
        return during

    await survive(tmp_path, restart)


async def test_every_service_survives_its_connections_being_closed(tmp_path: Path) -> None:
    async def close_connections(node: PrivateRabbitMQ, world: World,
                                ports: dict[str, int]) -> list[Edit]:
        await node.close_all_connections()
        return await edit(world, 12, 8)

    await survive(tmp_path, close_connections)

