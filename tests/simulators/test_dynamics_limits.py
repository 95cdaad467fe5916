"""Dataverse simulator: service protection limits (requests, execution time, concurrency)."""

from __future__ import annotations

import asyncio

import pytest

from services.simulators.dynamics import ServiceLimits
from tests.simulators.test_dynamics_support import organisation

pytestmark = pytest.mark.anyio


async def test_request_count_limit() -> None:
    async with organisation(limits=ServiceLimits(requests=3)) as org:
        first = await org.get("contacts")
        assert first.headers["x-ms-ratelimit-burst-remaining-xrm-requests"] == "2"
        for _ in range(2):
            assert (await org.get("contacts")).status == 200
        throttled = await org.get("contacts")
        assert throttled.status == 429
        assert int(throttled.headers["Retry-After"]) >= 1
        assert throttled.error == {"code": "0x80072322", "message": "Number of requests exceeded "
                                   "the limit of 3 over time window of 300 seconds."}


async def test_execution_time_limit() -> None:
    async with organisation(limits=ServiceLimits(execution_time_ms=0)) as org:
        assert (await org.get("contacts")).status == 200
        throttled = await org.get("contacts")
        assert throttled.status == 429
        assert throttled.error["code"] == "0x80072321"
        assert "Combined execution time" in throttled.error["message"]


async def test_concurrency_limit_errors_at_once() -> None:
    async with organisation(limits=ServiceLimits(concurrent=1)) as org:
        await org.sim("PUT", "faults", {"latency_ms": {"GET /api/data/v9.2/contacts": 300}})
        answers = await asyncio.gather(*(org.get("contacts") for _ in range(3)))
        statuses = sorted(a.status for a in answers)
        assert statuses == [200, 429, 429]
        throttled = next(a for a in answers if a.status == 429)
        assert throttled.error == {"code": "0x80072326", "message": "Number of concurrent "
                                   "requests exceeded the limit of 1."}


async def test_limits_settable_at_runtime_and_batch_counts_once() -> None:
    async with organisation() as org:
        changed = await org.sim("PUT", "limits", {"requests": 2})
        assert changed.json["requests"] == 2
        boundary = "batch_x"
        body = "".join(
            f"--{boundary}\r\nContent-Type: application/http\r\n\r\n"
            "GET contacts HTTP/1.1\r\n\r\n" for _ in range(5)) + f"--{boundary}--\r\n"
        batch = await org.call("POST", "$batch", data=body.encode(),
                               headers={"Content-Type": f"multipart/mixed; boundary={boundary}"})
        assert batch.status == 200
        assert (await org.get("contacts")).status == 200
        assert (await org.get("contacts")).status == 429
        stats = (await org.sim("GET", "stats")).json
        assert stats["statuses"]["429"] == 1


async def test_throttle_fault_uses_dataverse_shape() -> None:
    async with organisation() as org:
        await org.sim("PUT", "faults", {"throttle": {"limit": 1, "window_s": 60}})
        assert (await org.get("contacts")).status == 200
        throttled = await org.get("contacts")
        assert throttled.status == 429
        assert throttled.error["code"] == "0x80072322"
        assert "Retry-After" in throttled.headers
        await org.sim("PUT", "faults", {"error_rate": {"* /api/data/": 1.0}})
        failed = await org.get("contacts")
        assert failed.status == 500
        assert failed.error["code"] == "0x80040216"
