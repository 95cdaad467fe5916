"""``prefsync forget`` after a real sync, on both ledger backends: ``history`` and ``prefs``
then show nothing held by prefsync (the vendors' own records are still read live)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from common.store import open_store
from services.cli.prefs import history_view

from ..pipeline.conftest import World, make_worlds
from ..store.backends import store_url

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def prefsync(world: World, *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args, "--config", str(world.config_path),
        env={**os.environ, **world.env, "PREFSYNC_LOG_LEVEL": "WARNING"},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode() + err.decode()


async def json_of(world: World, *args: str) -> Any:
    code, out = await prefsync(world, *args, "--json")
    assert code == 0, out
    return orjson.loads(out)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_forget_after_a_sync_leaves_nothing_to_show(backend: str, tmp_path: Path) -> None:
    async with store_url(backend, tmp_path) as url, \
            make_worlds(tmp_path, store_url=url) as (world,):
        await world.start()
        await world.sync()
        async with open_store(url) as store:
            held = [p.email for p in world.people
                    if (await history_view(store, account=world.account, email=p.email))["history"]
                    and await store.states_for_email(world.account, p.email)]
        email, other = held[0], held[1]
        before = await json_of(world, "prefs", world.account, email)
        assert before["eligible"] and any(p["status"] != "not set" for p in before["preferences"])

        code, out = await prefsync(world, "forget", world.account, email, "--yes")
        assert code == 0 and f"erased {email}" in out, out

        assert (await json_of(world, "history", world.account, email))["history"] == []
        after = await json_of(world, "prefs", world.account, email)
        assert not after["eligible"] and after["dotdigital_contact"] is None
        assert [p["id"] for p in after["preferences"]] == [p["id"] for p in before["preferences"]]
        assert {p["status"] for p in after["preferences"]} == {"not set"}
        assert all(p["changed_by"] is None for p in after["preferences"])
        # the vendors' records are theirs: still read live, no longer in prefsync's directory
        assert after["contact_methods"] == [{**m, "eligible": False}
                                            for m in before["contact_methods"]]
        assert (await json_of(world, "history", world.account, other))["history"]
