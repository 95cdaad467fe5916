"""The commands a user types: the simulators, ``prefsync up`` and ``sync-now --wait``."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.harness.waiting import until

from .conftest import World

pytestmark = pytest.mark.anyio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def prefsync(*args: str, env: dict[str, str] | None = None,
                   log: Path | None = None) -> asyncio.subprocess.Process:
    """``prefsync ARGS``; a long-running one logs to ``log`` (a pipe nobody reads would fill)."""
    if log is not None:
        with log.open("ab") as sink:
            return await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.cli", *args, env={**os.environ, **(env or {})},
                stdout=sink, stderr=sink)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def wait_until_answering(url: str, process: asyncio.subprocess.Process) -> None:
    async with aiohttp.ClientSession() as http:

        async def answering() -> bool:
            assert process.returncode is None, (await process.stderr.read()).decode()  # type: ignore[union-attr]
            try:
                async with http.get(url) as response:
                    return response.status < 500
            except aiohttp.ClientConnectionError:
                return False

        await until(answering, timeout_s=10, what=f"{url} answering")


@pytest.mark.parametrize(("simulator", "printed"), [
    ("dynamics", "demo client"), ("dotdigital", "demo account")])
async def test_simulator_commands_serve_and_print_demo_credentials(simulator: str,
                                                                   printed: str) -> None:
    port = free_port()
    process = await prefsync("sim", simulator, "--port", str(port))
    try:
        await wait_until_answering(f"http://127.0.0.1:{port}/_sim/stats", process)
        async with aiohttp.ClientSession() as http, \
                http.post(f"http://127.0.0.1:{port}/_sim/reset") as response:
            assert response.status == 200
        assert process.stdout is not None
        first_line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
        assert printed in first_line.lower() or simulator in first_line.lower()
    finally:
        process.terminate()
        await process.wait()


@pytest.mark.slow
async def test_up_and_sync_now_wait_from_the_command_line(world: World, tmp_path: Path) -> None:
    up = await prefsync("up", "--config", str(world.config_path), env=world.env,
                        log=tmp_path / "up.log")
    try:
        for service in ("reconciler", "writer", "dynamics-poller", "ec-poller"):
            await world.wait_consuming(service)
        person, preference = world.people[2], world.preferences[0]
        now = await prefsync("sync-now", world.account, "--wait", "--timeout", "120",
                             "--config", str(world.config_path), env=world.env)
        out, err = await now.communicate()
        assert now.returncode == 0, err.decode()
        assert f"sync of {world.account} finished" in out.decode()
        _, before = await world.values(person.email, preference.id)
        wanted = not before if before is not None else True
        await world.edit_dynamics(person.email, preference.id, wanted)
        again = await prefsync("sync-now", world.account, "--wait", "--config",
                               str(world.config_path), env=world.env)
        out, err = await again.communicate()
        assert again.returncode == 0, err.decode()
        assert "applied: 1 to dotdigital" in out.decode()
        assert await world.values(person.email, preference.id) == ({wanted}, wanted)
    finally:
        up.terminate()
        await up.wait()


async def test_bad_config_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "prefsync.toml"
    config.write_text('[broker]\nurl = "amqp://x"\n[store]\nurl = "sqlite:///x.db"\n'
                      '[[accounts]]\nid = "Bad Id"\n')
    process = await prefsync("up", "--config", str(config))
    _, err = await process.communicate()
    assert process.returncode == 2
    assert "accounts[0].id" in err.decode()
