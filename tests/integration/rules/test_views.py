"""What a user sees: ``prefsync prefs``, ``history`` and ``status``, and the same over HTTP."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest

from common.config import Secret
from services.cli.prefs import api_app, api_resources
from tests.conftest import serving

from ..pipeline.conftest import World
from .conftest import Vendors, prefs, synced

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def prefsync(world: World, *args: str) -> tuple[int, str]:
    """A ``prefsync`` command against the world's config; (exit code, what it printed)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args, "--config", str(world.config_path),
        env={**os.environ, **world.env, "PREFSYNC_LOG_LEVEL": "WARNING"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode() + err.decode()


async def edited(world: World, org: Vendors) -> tuple[Any, int, bool, str]:
    """A person whose first preference was just changed in Dynamics, with bulk email off."""
    person, preference = world.people[1], world.preferences[0]
    _, before = await world.values(person.email, preference.id)
    wanted = not before if before is not None else True
    await world.set_clock("dynamics", {"offset_s": 2})
    await world.edit_dynamics(person.email, preference.id, wanted)
    (record,) = await org.record_values(person.email)
    await org.set_record(person.kind, record, {"donotbulkemail": True})
    await synced(world)
    return person, preference.id, wanted, record


async def test_prefs_history_and_status_commands(world: World, org: Vendors) -> None:
    person, pid, wanted, record = await edited(world, org)
    code, out = await prefsync(world, "prefs", world.account, person.email.upper(), "--json")
    assert code == 0, out
    view = orjson.loads(out)
    shown = {p["id"]: p for p in view["preferences"]}
    assert set(shown) == {p.id for p in world.preferences}
    assert shown[pid]["status"] == ("opted in" if wanted else "opted out")
    assert shown[pid]["changed_by"] == "dynamics" and shown[pid]["changed_at"]
    assert shown[pid]["category"] == {"id": pid - 1, "name": "Marketing"}  # the seeded tree
    assert view["contact_methods"] == [{
        "record_type": person.kind, "record_id": record, "active": True,
        "bulk_email": "do not allow", "email": "allow", "eligible": True}]
    assert view["dotdigital_contact"]["status"] == "Subscribed"
    checks: dict[str, Callable[[dict[str, Any]], bool]] = {"opted-in": lambda p: p["status"] == "opted in",
              "opted-out": lambda p: p["status"] == "opted out",
              "private": lambda p: not p["public"], "public": lambda p: p["public"]}
    for name, check in checks.items():
        code, out = await prefsync(world, "prefs", world.account, person.email, "--filter",
                                   name, "--json")
        filtered = orjson.loads(out)["preferences"]
        assert [p["id"] for p in filtered] == [p["id"] for p in shown.values() if check(p)]

    code, out = await prefsync(world, "prefs", world.account, person.email)
    assert code == 0 and "bulk email do not allow" in out and "last changed in dynamics" in out

    code, out = await prefsync(world, "history", world.account, person.email, "--json")
    decisions = {(h["preference_id"], h["side"], h["decision"])
                 for h in orjson.loads(out)["history"]}
    assert (pid, "dynamics", "applied") in decisions
    assert (pid, "dotdigital", "written") in decisions  # our write to dotdigital
    code, out = await prefsync(world, "history", world.account, person.email)
    assert code == 0 and "-> applied" in out and "written by prefsync" in out

    code, out = await prefsync(world, "status", world.account)
    assert code == 0 and f"{world.account}: Synchronised" in out and "next run: only" in out
    code, out = await prefsync(world, "status", "--json")
    assert orjson.loads(out)[0]["state"] == "Synchronised"
    code, out = await prefsync(world, "prefs", world.account, "not-an-email")
    assert code == 2 and "not an email address" in out


async def test_http_api_serves_the_same_views_to_who_holds_the_token(world: World,
                                                                     org: Vendors) -> None:
    person, pid, _, _ = await edited(world, org)
    email = quote(person.email)
    async with api_resources(world.config) as (store, clients):
        app = api_app(config=world.config, store=store, dataverse=clients,
                      token=Secret("let-me-in"))
        async with serving(app) as base, aiohttp.ClientSession() as http:
            async def get(path: str, token: str | None = "let-me-in") -> tuple[int, Any]:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                async with http.get(base + path, headers=headers) as response:
                    return response.status, await response.json()

            account = f"/accounts/{world.account}"
            assert (await get(f"{account}/contacts/{email}/preferences", None))[0] == 401
            assert (await get(f"{account}/contacts/{email}/preferences", "wrong"))[0] == 401
            code, body = await get(f"{account}/contacts/{email}/preferences?filter=public")
            assert code == 200
            assert body == await prefs(world, person.email, "public")
            code, body = await get(f"{account}/contacts/{email}/history")
            assert code == 200 and any(h["preference_id"] == pid for h in body["history"])
            code, body = await get(f"{account}/status")
            assert code == 200 and body["state"] == "Synchronised"
            assert (await get(f"/accounts/another/contacts/{email}/preferences"))[0] == 404
            code, body = await get(f"{account}/contacts/{email}/preferences?filter=some")
            assert code == 400 and "filter" in body["error"]
            assert (await get(f"{account}/contacts/nobody/history"))[0] == 400


async def test_the_api_command_serves_until_stopped(world: World) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "api", "--port", "0", "--token-env", "API_TOKEN",
        "--config", str(world.config_path),
        env={**os.environ, **world.env, "API_TOKEN": "t0ken", "PREFSYNC_LOG_LEVEL": "WARNING"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{match.group(1)}/accounts/{world.account}/status",
                headers={"Authorization": "Bearer t0ken"}) as response:
            assert response.status == 200
            assert (await response.json())["account"] == world.account
    finally:
        process.terminate()
        await process.wait()
