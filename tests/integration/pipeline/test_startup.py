"""A service started while the broker or the ledger's database is down (a container restarted
by its policy during an outage) waits for it, with backoff, instead of exiting, and consumes
once it is back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.harness.private_services import (
    PrivatePostgres,
    PrivateRabbitMQ,
    private_postgres,
    private_rabbitmq,
)
from tests.harness.unavailable import needs_postgres_server, needs_rabbitmq_server

from .conftest import World, make_world, make_worlds

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

# A service that gave up would exit within about a second (code 3, or 1).
GIVES_UP_WITHIN_S = 5.0


async def assert_still_waiting(process: asyncio.subprocess.Process) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(process.wait()), timeout=GIVES_UP_WITHIN_S)


@asynccontextmanager
async def world_on_private(dependency: str, tmp_path: Path
                           ) -> AsyncIterator[tuple[PrivateRabbitMQ | PrivatePostgres, World]]:
    """A world whose broker or ledger database (``dependency``) is a private one, and that."""
    if dependency == "broker":
        async with private_rabbitmq() as node, \
                make_world(tmp_path, broker_url=node.url) as world:
            yield node, world
        return
    async with private_postgres() as cluster, \
            make_worlds(tmp_path, store_url=cluster.url) as (world,):
        yield cluster, world


@pytest.mark.parametrize(("dependency", "service"), [
    pytest.param("broker", "writer", marks=needs_rabbitmq_server),
    pytest.param("postgresql", "reconciler", marks=needs_postgres_server),
])
async def test_a_service_started_while_its_dependency_is_down_comes_up_once_it_is_back(
        tmp_path: Path, dependency: str, service: str) -> None:
    async with world_on_private(dependency, tmp_path) as (server, world):
        # RabbitMQ: its application stopped, which closes its listeners (a client is refused
        # as by a node that is down) and keeps the Erlang VM, which takes seconds to boot
        if isinstance(server, PrivateRabbitMQ):
            down, up = server.stop_app, server.start_app
        else:
            down, up = server.stop, server.start
        await down()
        process = await world.spawn(service, wait=False)
        await assert_still_waiting(process)
        await up()
        await world.wait_consuming(service, process)
        assert process.returncode is None
