"""Replay from the changes log: rebuilds a deleted ledger, and a second replay changes nothing."""

from __future__ import annotations

import io
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from common.domain import KeyState, PreferenceKey
from common.store.codec import decode_state
from services.cli.replay import ReplayError, format_report, parse_when, replay
from tests.integration.pipeline.conftest import World

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def ledger_path(world: World) -> Path:
    return Path(world.config.store.url.removeprefix("sqlite:///"))


def ledger(world: World) -> dict[tuple[str, int], KeyState]:
    with sqlite3.connect(ledger_path(world)) as db:
        rows = db.execute("SELECT email, preference_id, revision, state FROM key_state "
                          "WHERE account = ?", (world.account,)).fetchall()
    return {(email, pref): decode_state(PreferenceKey(account=world.account, email=email,
                                                      preference_id=pref), revision, blob)
            for email, pref, revision, blob in rows}


def delete_ledger(world: World) -> None:
    """What the reconciler knows: key states, history, contact states, deferred and parked
    writes, and its marks of complete dotdigital reads (the record directory and the pollers'
    read positions stay: they are what the pollers know)."""
    with sqlite3.connect(ledger_path(world)) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        for table in ("key_state", "history", "contact_state", "deferred_writes",
                      "parked_observations"):
            if table in tables:
                db.execute(f"DELETE FROM {table} WHERE account = ?", (world.account,))
        db.execute("DELETE FROM checkpoint WHERE account = ? AND source LIKE 'reconciler:read:%'",
                   (world.account,))


def values(states: dict[tuple[str, int], KeyState]) -> dict[tuple[str, int], bool | None]:
    return {k: s.register.opted_in if s.register else None for k, s in states.items()}


async def both_sides(world: World) -> dict[str, tuple[object, object]]:
    out: dict[str, tuple[object, object]] = {}
    for person in world.people:
        out[person.email] = (await world.dynamics_values(person.email),
                             await world.dotdigital_values(person.email))
    return out


async def test_replay_rebuilds_a_deleted_ledger_and_is_idempotent(world: World) -> None:
    since = datetime.now(UTC) - timedelta(seconds=2)
    await world.start()
    assert (await world.sync())["failed"] == 0
    person, other = world.people[0], world.people[1]
    preference = world.preferences[0].id
    await world.edit_dynamics(person.email, preference, False)
    await world.edit_dotdigital(other.email, preference, True)
    assert (await world.sync())["failed"] == 0
    before = ledger(world)
    sides = await both_sides(world)
    assert before and values(before)[(person.email.lower(), preference)] is False

    await world.stop()
    delete_ledger(world)
    assert ledger(world) == {}
    await world.start()

    first = await replay(config=world.config, account=world.account, since=since,
                         timeout_s=120, out=io.StringIO(), progress=io.StringIO())
    assert first.finished and first.fed > 0, format_report(first)
    assert first.changes["dynamics"] > 0 and first.changes["dotdigital"] > 0
    rebuilt = ledger(world)
    assert values(rebuilt) == values(before)
    assert await both_sides(world) == sides

    second = await replay(config=world.config, account=world.account, since=since,
                          timeout_s=120, out=io.StringIO(), progress=io.StringIO())
    assert second.finished and second.fed == first.fed, format_report(second)
    assert second.summary is not None
    assert second.summary["applied_to_dotdigital"] == 0
    assert second.summary["applied_to_dynamics"] == 0
    assert set(second.summary["outcomes"]) <= {"duplicate", "stale", "echo", "ineligible"}, (
        second.summary)
    assert ledger(world) == rebuilt  # not even a revision moved
    assert await both_sides(world) == sides


async def test_dry_run_prints_and_feeds_nothing(world: World) -> None:
    since = datetime.now(UTC) - timedelta(seconds=2)
    await world.start()
    assert (await world.sync())["failed"] == 0
    before = ledger(world)
    printed = io.StringIO()
    report = await replay(config=world.config, account=world.account, since=since,
                          dry_run=True, out=printed, progress=io.StringIO())
    assert report.fed > 0 and report.summary is None
    assert report.reads  # the first sync read dotdigital completely: its markers go last
    lines = printed.getvalue().splitlines()
    assert len([line for line in lines if line.startswith("would feed")]) == report.fed
    assert ledger(world) == before


async def test_until_bounds_the_window(world: World) -> None:
    await world.start()
    assert (await world.sync())["failed"] == 0
    report = await replay(config=world.config, account=world.account,
                          since=datetime.now(UTC) - timedelta(hours=1),
                          until=datetime.now(UTC) - timedelta(minutes=30), dry_run=True,
                          out=io.StringIO(), progress=io.StringIO())
    assert report.read == 0 and report.fed == 0


def test_parse_when() -> None:
    now = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_when("2h", now=now) == now - timedelta(hours=2)
    assert parse_when("90m", now=now) == now - timedelta(minutes=90)
    assert parse_when("2026-05-01T10:00:00", now=now) == datetime(2026, 5, 1, 10, tzinfo=UTC)
    assert parse_when("2026-05-01T10:00:00+02:00", now=now) == datetime(2026, 5, 1, 8, tzinfo=UTC)
    with pytest.raises(ReplayError):
        parse_when("yesterday", now=now)
