"""A service started while the broker or the ledger's database is down (a container restarted
by its policy during an outage) waits for it, with backoff, instead of exiting, and consumes
once it is back."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest

from tests.harness.private_services import (
    postgres_available,
    private_postgres,
    private_rabbitmq,
    rabbitmq_available,
)

from .conftest import make_world, make_worlds

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

# A service that gave up would exit within about a second (code 3, or 1).
GIVES_UP_WITHIN_S = 5.0


async def assert_still_waiting(process: asyncio.subprocess.Process) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(process.wait()), timeout=GIVES_UP_WITHIN_S)


@pytest.mark.skipif(not rabbitmq_available(), reason="needs rabbitmq-server")
async def test_a_service_started_while_the_broker_is_down_comes_up_once_it_is_back(
        tmp_path: Path) -> None:
    # not under pytest's base folder (see test_broker_outage.survive)
    with tempfile.TemporaryDirectory(prefix="prefsync-rabbitmq-") as root:
        async with private_rabbitmq(Path(root)) as node, \
                make_world(tmp_path, broker_url=node.url) as world:
            await node.stop()
            process = await world.spawn("writer", wait=False)
            await assert_still_waiting(process)
            await node.start()
            await world.wait_consuming("writer", process)
            assert process.returncode is None


@pytest.mark.skipif(not postgres_available(), reason="needs PostgreSQL's initdb and pg_ctl")
async def test_a_service_started_while_postgresql_is_down_comes_up_once_it_is_back(
        tmp_path: Path) -> None:
    (tmp_path / "world").mkdir()
    async with private_postgres(tmp_path / "postgres") as cluster, \
            make_worlds(tmp_path / "world", store_url=cluster.url) as (world,):
        await cluster.stop()
        process = await world.spawn("reconciler", wait=False)
        await assert_still_waiting(process)
        await cluster.start()
        await world.wait_consuming("reconciler", process)
        assert process.returncode is None
