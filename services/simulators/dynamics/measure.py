"""Measure the simulator at scale: ``python -m services.simulators.dynamics.measure [records]``.

Seeds ``records`` people × 5 preferences (250,000 gives about a million subscription rows), then
times, over a real socket, the calls a sync makes: a 5000-row page (first and a later one), an
indexed lookup, a ``modifiedon`` poll page, a delta after a few writes, single writes, and a
100-operation ``$batch``. Prints one line per measurement.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from ..base import serve
from . import DynamicsSimulator

SUBS = "psync_marketingpreferencesubscriptions"


async def _timed(label: str, call: Callable[[], Awaitable[Any]], repeat: int = 5) -> Any:
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = await call()
        best = min(best, time.perf_counter() - started)
    print(f"{label:<48} {best * 1000:8.1f} ms (best of {repeat})", flush=True)
    return result


async def measure(records: int) -> None:
    sim = DynamicsSimulator(clients=["t:c:s"])
    ports: asyncio.Queue[int] = asyncio.Queue()
    server = asyncio.create_task(serve(sim.app, host="127.0.0.1", port=0,
                                       ready=ports.put_nowait))
    base = f"http://127.0.0.1:{await ports.get()}"
    api = f"{base}/api/data/v9.2"
    async with aiohttp.ClientSession() as s:
        started = time.perf_counter()
        async with s.post(f"{base}/_sim/seed", json={"records": records, "preferences": 5,
                                                      "seed": 1}) as r:
            made = await r.json()
        print(f"seed {records} records x 5 preferences: {made['subscriptions']} subscriptions "
              f"in {time.perf_counter() - started:.1f} s", flush=True)
        async with s.post(f"{base}/t/oauth2/v2.0/token", data={
                "grant_type": "client_credentials", "client_id": "c", "client_secret": "s",
                "scope": f"{base}/.default"}) as r:
            token = (await r.json())["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        page = {**auth, "Prefer": "odata.maxpagesize=5000"}

        async def get(url: str, headers: dict[str, str]) -> Any:
            async with s.get(url, headers=headers) as r:
                assert r.status == 200, await r.text()
                return await r.json()

        first = await _timed("5000-row page of subscriptions (first)",
                             lambda: get(f"{api}/{SUBS}?$select=psync_status", page))
        nxt = first["@odata.nextLink"]
        for _ in range(50):  # somewhere in the middle
            nxt = (await get(nxt, page))["@odata.nextLink"]
        await _timed("5000-row page of subscriptions (page 52)", lambda: get(nxt, page))
        contact = first["value"][0]
        sub_id = contact["psync_marketingpreferencesubscriptionid"]
        row = await get(f"{api}/{SUBS}({sub_id})", auth)
        record = row["_psync_contactid_value"] or row["_psync_leadid_value"]
        column = "_psync_contactid_value" if row["_psync_contactid_value"] else "_psync_leadid_value"
        await _timed("subscriptions of one record (lookup index)",
                     lambda: get(f"{api}/{SUBS}?$filter={column} eq {record}", auth))
        await _timed("contact by e-mail (e-mail index)", lambda: get(
            f"{api}/contacts?$filter=emailaddress1 eq '{made['sample_emails'][0]}'", auth))
        tracked = await get(f"{api}/{SUBS}?$select=psync_status",
                            {**page, "Prefer": "odata.track-changes,odata.maxpagesize=5000"})
        link = tracked["@odata.nextLink"]
        while "@odata.nextLink" in tracked:
            tracked = await get(tracked["@odata.nextLink"], {**page, "Prefer":
                                "odata.track-changes,odata.maxpagesize=5000"})
        delta_link = tracked["@odata.deltaLink"]
        assert link
        flip = {"value": 100000001}

        async def write() -> None:
            flip["value"] ^= 1
            async with s.patch(f"{api}/{SUBS}({sub_id})", json={"psync_status": flip["value"]},
                               headers={**auth, "If-Match": "*"}) as r:
                assert r.status == 204, await r.text()

        await _timed("PATCH one subscription (If-Match: *)", write, repeat=20)
        await _timed("delta after those writes", lambda: get(delta_link, page))
        await _timed("poll page: modifiedon ge T, ordered by modifiedon", lambda: get(
            f"{api}/{SUBS}?$select=psync_status&$filter=modifiedon ge 2000-01-01T00:00:00Z"
            "&$orderby=modifiedon asc,psync_marketingpreferencesubscriptionid asc", page))
        ids = [r["psync_marketingpreferencesubscriptionid"] for r in first["value"][:100]]
        boundary = f"batch_{uuid.uuid4()}"
        body = "".join(
            f"--{boundary}\r\nContent-Type: application/http\r\n\r\nPATCH {api}/{SUBS}({i}) "
            "HTTP/1.1\r\nContent-Type: application/json\r\nIf-Match: *\r\n\r\n"
            '{"psync_status":100000000}\r\n' for i in ids) + f"--{boundary}--\r\n"

        async def batch() -> None:
            async with s.post(f"{api}/$batch", data=body.encode(), headers={
                    **auth, "Content-Type": f"multipart/mixed; boundary={boundary}"}) as r:
                assert r.status == 200, await r.text()
                await r.read()

        await _timed("$batch of 100 PATCHes", batch)
    server.cancel()


if __name__ == "__main__":
    asyncio.run(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 250_000))
