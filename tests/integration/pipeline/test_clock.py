"""Each vendor's clock trusted only as far as it is measured, end to end.

A simulator's clock is moved with ``PUT /_sim/clock``. A change meant to happen "five seconds
later in real time" is made with that vendor's clock five seconds further on and the clock put
back before the sync, so no test waits five real seconds: prefsync measures the clock as it is
during the sync, exactly as it would after five real seconds.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from common.store import open_store
from services.cli.prefs import history_view
from services.runtime.status import account_status

from .conftest import World

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

YEAR_S = 365 * 86_400.0


async def converge(world: World) -> None:
    summary = await world.sync()
    assert summary["failed"] == 0, summary


async def clocks(world: World) -> dict[str, dict[str, object]]:
    async with open_store(world.config.store.url) as store:
        status = await account_status(store, account=world.account,
                                      schedule=world.config.account(world.account).schedule)
    result: dict[str, dict[str, object]] = status["clocks"]
    return result


async def history(world: World, email: str, preference_id: int) -> list[dict[str, object]]:
    async with open_store(world.config.store.url) as store:
        view = await history_view(store, account=world.account, email=email)
    return [h for h in view["history"] if h["preference_id"] == preference_id]


async def test_dotdigital_ahead_an_earlier_opt_in_there_never_beats_a_later_opt_out(
        world: World) -> None:
    await world.start()
    await converge(world)
    person, preference = world.people[4], world.preferences[0]
    await world.edit_dynamics(person.email, preference.id, True)
    await converge(world)
    await world.set_clock("dotdigital", {"offset_s": 30})
    await world.edit_dotdigital(person.email, preference.id, True)
    # five seconds later in real time, an opt-out in Dynamics (its clock is right)
    await world.set_clock("dynamics", {"offset_s": 5})
    await world.edit_dynamics(person.email, preference.id, False)
    await world.set_clock("dynamics", {})
    await converge(world)
    assert await world.values(person.email, preference.id) == ({False}, False)
    measured = await clocks(world)
    assert abs(float(measured["dotdigital"]["offset_s"]) - 30) < 0.5, measured  # type: ignore[arg-type]
    # the history holds the vendor's own time and the one in our time base
    seen = [h for h in await history(world, person.email, preference.id)
            if h["side"] == "dotdigital" and h["opted_in"] and h["decision"] != "written"]
    raw = datetime.fromisoformat(str(seen[-1]["origin_time"]))
    corrected = datetime.fromisoformat(str(seen[-1]["corrected_time"]))
    assert timedelta(seconds=29) < raw - corrected < timedelta(seconds=31), seen[-1]


async def test_dotdigital_behind_its_later_opt_in_wins(world: World) -> None:
    await world.start()
    await world.set_clock("dotdigital", {"offset_s": -30})
    await converge(world)
    person, preference = world.people[6], world.preferences[1]
    await world.edit_dynamics(person.email, preference.id, False)
    # five seconds later in real time, an opt-in in dotdigital (its clock 30 s behind)
    await world.set_clock("dotdigital", {"offset_s": -25})
    await world.edit_dotdigital(person.email, preference.id, True)
    await world.set_clock("dotdigital", {"offset_s": -30})
    await converge(world)
    assert await world.values(person.email, preference.id) == ({True}, True)
    measured = await clocks(world)
    assert abs(float(measured["dotdigital"]["offset_s"]) + 30) < 0.5, measured  # type: ignore[arg-type]


async def test_a_change_stamped_a_year_ahead_does_not_block_a_later_opt_out(
        world: World) -> None:
    await world.start()
    await converge(world)
    person, preference = world.people[8], world.preferences[2]
    await world.set_clock("dotdigital", {"offset_s": YEAR_S})
    await world.edit_dotdigital(person.email, preference.id, True)
    await world.set_clock("dotdigital", {})
    await converge(world)
    assert await world.values(person.email, preference.id) == ({True}, True)
    # a real opt-out in Dynamics, later: it wins, and the sync settles
    await world.set_clock("dynamics", {"offset_s": 2})
    await world.edit_dynamics(person.email, preference.id, False)
    await world.set_clock("dynamics", {})
    await converge(world)
    assert await world.values(person.email, preference.id) == ({False}, False)
    await converge(world)  # the echo of our write is read back here
    summary = await world.sync()
    assert summary["applied_to_dotdigital"] == summary["applied_to_dynamics"] == 0, summary
    entries = await history(world, person.email, preference.id)
    assert any(h["decision"] == "future_timestamp" for h in entries), entries


@pytest.mark.parametrize("dynamics_value", [True, False])
async def test_offsets_within_the_uncertainty_are_ties_and_the_opt_out_wins(
        world: World, dynamics_value: bool) -> None:
    """Dynamics 20 s ahead, dotdigital 21.5 s: two changes made at one instant carry stamps
    1.5 s apart, yet in our time base they are at one time: a tie, and the opt-out wins."""
    await world.start()
    await world.set_clock("dynamics", {"offset_s": 20})
    await world.set_clock("dotdigital", {"offset_s": 21.5})
    await converge(world)
    person, preference = world.people[9], world.preferences[2]
    instant = (datetime.now(UTC) + timedelta(seconds=22)).replace(microsecond=0)
    await world.set_clock("dynamics", {"freeze_at": instant.isoformat()})
    await world.set_clock("dotdigital", {
        "freeze_at": (instant + timedelta(seconds=1.5)).isoformat()})
    await world.edit_dynamics(person.email, preference.id, dynamics_value)
    await world.edit_dotdigital(person.email, preference.id, not dynamics_value)
    await world.set_clock("dynamics", {"offset_s": 20})
    await world.set_clock("dotdigital", {"offset_s": 21.5})
    await converge(world)
    assert await world.values(person.email, preference.id) == ({False}, False)
