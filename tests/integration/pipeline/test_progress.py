"""Progress of long commands: drawn on a terminal, never into a pipe."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

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
