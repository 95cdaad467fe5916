"""``prefsync demo --keep``: the story, then the console's address and token, everything left
running until Ctrl-C, then stopped and cleaned up."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys

import aio_pika
import aiohttp
import pytest

from common.messaging.topology import Topology
from tests.integration.pipeline.conftest import BROKER_URL

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_demo_keep_serves_the_console_until_ctrl_c() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "demo", "--records", "30", "--keep",
        "--console-port", "0", "--broker-url", BROKER_URL,
        env={**os.environ, "PREFSYNC_LOG_LEVEL": "WARNING"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert process.stdout is not None
    output: list[str] = []
    try:
        async with asyncio.timeout(180):
            while not output or "Press Ctrl-C to stop." not in output[-1]:
                line = (await process.stdout.readline()).decode()
                assert line, "the demo ended early:\n" + "".join(output)
                output.append(line)
        text = "".join(output)
        found = re.search(r"Console: +(http://127\.0\.0\.1:\d+)/ +\(log in with the token (\S+)\)",
                          text)
        assert found, text
        url, token = found[1], found[2]
        assert "DIFF" not in text and "failed: 0" in text, text
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/login") as page:
                assert page.status == 200 and "Access token" in await page.text()
            async with http.get(f"{url}/", headers={"Authorization": f"Bearer {token}"}) as page:
                body = await page.text()
                assert page.status == 200 and 'data-state="Synchronised"' in body
        account = re.search(r'data-account="(demo-[0-9a-f]+)"', body)
        assert account, body
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
    async with asyncio.timeout(60):
        rest = (await process.stdout.read()).decode()
        assert await process.wait() == 0, text + rest
    assert "Stopped." in rest
    # stopped: the console answers no more, and the demo's queues are gone
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"{url}/login")
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
            await channel.declare_queue(Topology.dead_letter_queue(account[1]), passive=True)
