"""``prefsync sim seed``: seed both running simulators with the same sample data (for a demo).

Both simulators seeded with one seed share their people, so a prefsync account pointed at them
has overlapping contacts whose preferences mostly agree and sometimes drift. The simulators may
still be starting (as in ``docker compose up``): each is retried until ``wait_s`` has passed.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, TextIO

import aiohttp


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any], *,
                deadline: float) -> None:
    while True:
        try:
            async with http.post(url, json=body) as response:
                if response.status < 300:
                    return
                raise RuntimeError(f"{url}: {response.status} {await response.text()}")
        except aiohttp.ClientConnectionError:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.5)


async def seed_simulators(*, dynamics_url: str, dotdigital_url: str, account: str,
                          dotdigital_account: str, records: int, preferences: int, seed: int,
                          wait_s: float = 60.0, out: TextIO = sys.stdout) -> int:
    body = {"records": records, "preferences": preferences, "seed": seed}
    deadline = time.monotonic() + wait_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        await _post(http, f"{dynamics_url.rstrip('/')}/_sim/seed", {**body, "account": account},
                    deadline=deadline)
        await _post(http, f"{dotdigital_url.rstrip('/')}/_sim/seed",
                    {**body, "account": dotdigital_account}, deadline=deadline)
    print(f"seeded {records} people with {preferences} preferences for account {account} "
          f"(dotdigital account {dotdigital_account}, seed {seed})", file=out)
    return 0
