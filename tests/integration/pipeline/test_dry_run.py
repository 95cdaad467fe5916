"""``sync-now --dry-run``: the same read and reconcile as a sync, with nothing written anywhere."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.cli.dry_run import dry_run_command

from .conftest import World, make_world

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def ledger_rows(path: Path) -> list[str]:
    """Every row of every table of the SQLite ledger, as SQL."""
    with sqlite3.connect(path) as db:
        return list(db.iterdump())


def writes_seen(stats: dict[str, Any]) -> dict[str, int]:
    """What a simulator was asked to change: writes applied, and calls that are not reads
    (the OAuth token request aside; a ``$batch`` counts by the operations it holds, which the
    simulator counts under their own routes)."""
    calls = {route: n for route, n in stats["calls"].items()
             if not route.startswith("GET ") and "/oauth2/" not in route
             and not route.endswith("/$batch")}
    return {"writes_applied": stats["writes_applied"], **calls}


async def flip(world: World, side: str, person: int, preference: int) -> bool:
    email, preference_id = world.people[person].email, world.preferences[preference].id
    dynamics, dotdigital = await world.values(email, preference_id)
    current = dotdigital if side == "dotdigital" else next(iter(dynamics))
    wanted = not current if current is not None else side == "dynamics"
    if side == "dynamics":
        await world.edit_dynamics(email, preference_id, wanted)
    else:
        await world.edit_dotdigital(email, preference_id, wanted)
    return wanted


async def dry_run(world: World) -> dict[str, Any]:
    out = io.StringIO()
    assert await dry_run_command(config=world.config, account=world.account, as_json=True,
                                 limit=2, out=out) == 0
    report: dict[str, Any] = orjson.loads(out.getvalue())
    return report


async def test_a_dry_run_writes_nothing_and_counts_what_the_next_sync_does(
        world: World, tmp_path: Path) -> None:
    await world.start()
    first = await world.sync()
    assert first["failed"] == 0, first
    await world.stop()  # nothing else writes to the ledger while it is compared
    # Pending changes on both sides, on keys of their own: three people each, in Dynamics
    # opting in or out of one preference, in dotdigital of another.
    wanted_dd = [await flip(world, "dynamics", p, 0) for p in (1, 2, 3)]
    wanted_dyn = [await flip(world, "dotdigital", p, 1) for p in (4, 5, 6)]
    ledger = ledger_rows(tmp_path / "ledger.db")
    stats = {side: writes_seen(await world.stats(side)) for side in ("dynamics", "dotdigital")}

    report = await dry_run(world)

    # nothing written at either vendor, nothing committed to the ledger (checkpoints and
    # delta tokens included)
    assert {side: writes_seen(await world.stats(side))
            for side in ("dynamics", "dotdigital")} == stats
    assert ledger_rows(tmp_path / "ledger.db") == ledger
    assert report["dry_run"] is True
    assert report["applied_to_dotdigital"] == 3 and report["applied_to_dynamics"] == 3, report
    assert report["writes"]["dotdigital"] == {"opt_in": wanted_dd.count(True),
                                              "opt_out": wanted_dd.count(False)}
    assert report["writes"]["dynamics"] == {"opt_in": wanted_dyn.count(True),
                                            "opt_out": wanted_dyn.count(False)}
    by_preference = {p["preference_id"]: p for p in report["by_preference"]}
    assert sum(by_preference[world.preferences[0].id]["to_dotdigital"].values()) == 3
    assert sum(by_preference[world.preferences[1].id]["to_dynamics"].values()) == 3
    samples = report["samples"]
    assert all(len(emails) <= 2 for emails in samples.values())
    edited_in_dynamics = {world.people[p].email for p in (1, 2, 3)}
    assert set(samples["to_dotdigital_opt_in"] + samples["to_dotdigital_opt_out"]) \
        <= edited_in_dynamics

    # the same changes are still there to read: the real sync does what the dry run said
    await world.start()
    summary = await world.sync()
    assert summary["failed"] == 0, summary
    assert report["read"] == summary["read"]
    assert report["outcomes"] == summary["outcomes"]
    assert report["applied_to_dotdigital"] == summary["applied_to_dotdigital"]
    assert report["applied_to_dynamics"] == summary["applied_to_dynamics"]


async def test_a_dry_run_of_a_first_sync_counts_what_it_does(tmp_path: Path) -> None:
    # a first sync reads everything, and defers dotdigital writes until a complete read
    async with make_world(tmp_path, records=200, preferences=4) as world:
        stats = {side: writes_seen(await world.stats(side)) for side in ("dynamics", "dotdigital")}
        report = await dry_run(world)
        assert {side: writes_seen(await world.stats(side))
                for side in ("dynamics", "dotdigital")} == stats
        assert report["applied_to_dotdigital"] > 0 and report["applied_to_dynamics"] > 0
        await world.start()
        summary = await world.sync()
        assert summary["failed"] == 0, summary
        assert (report["read"], report["outcomes"]) == (summary["read"], summary["outcomes"])
        assert report["applied_to_dotdigital"] == summary["applied_to_dotdigital"]
        assert report["applied_to_dynamics"] == summary["applied_to_dynamics"]
