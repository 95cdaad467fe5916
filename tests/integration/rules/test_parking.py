"""Observations parked while a contact is suppressed: newest per side, per email, in order
(on both ledger backends)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from common.domain import Observation, PreferenceKey
from common.store import open_store
from tests.harness.keys import T

from ..store.backends import BACKENDS, make_old_table, store_url

pytestmark = pytest.mark.anyio


def seen(email: str, side: str, opted_in: bool, *, at: int, version: int | None = None,
         pref: int = 1001, account: str = "acme") -> Observation:
    return Observation(key=PreferenceKey(account=account, email=email, preference_id=pref),
                       side="dynamics" if side == "dynamics" else "dotdigital",
                       opted_in=opted_in, origin_time=T + timedelta(seconds=at), version=version,
                       change_id=f"{side}:{at}")


@pytest.mark.parametrize("backend", BACKENDS)
async def test_newest_per_side_is_kept_and_taken_back_in_time_order(backend: str,
                                                                    tmp_path: Path) -> None:
    async with store_url(backend, tmp_path) as url, open_store(url) as store:
        await store.park_observations([
            seen("ann@example.com", "dynamics", True, at=5, version=10),
            seen("ann@example.com", "dotdigital", False, at=3),
        ])
        # an older Dynamics row version and an older dotdigital time never replace newer ones
        await store.park_observations([
            seen("ann@example.com", "dynamics", False, at=9, version=8),
            seen("ann@example.com", "dotdigital", True, at=1),
            seen("bob@example.com", "dotdigital", True, at=2),
            seen("ann@example.com", "dotdigital", True, at=2, account="other"),
        ])
        parked = await store.parked_observations("acme", ["ANN@example.com "])
        assert [(o.side, o.opted_in, o.version) for o in parked] == [
            ("dotdigital", False, None), ("dynamics", True, 10)]
        await store.unpark_observations("acme", ["ann@example.com"])
        assert await store.parked_observations("acme", ["ann@example.com"]) == []
        assert len(await store.parked_observations("acme", ["bob@example.com"])) == 1
        assert len(await store.parked_observations("other", ["ann@example.com"])) == 1


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_joined_or_carried_value_is_taken_back_as_what_it_was(backend: str,
                                                                      tmp_path: Path) -> None:
    # A record that took a suppressed contact's email: taken back as a plain read, its value
    # would compete for the register (the newest change), and opt the person back in.
    async with store_url(backend, tmp_path) as url, open_store(url) as store:
        joined = replace(seen("ann@example.com", "dynamics", True, at=5, version=10),
                         joined=True)
        carried = replace(seen("ann@example.com", "dotdigital", True, at=4), carried=True)
        await store.park_observations([joined, carried])
        assert await store.parked_observations("acme", ["ann@example.com"]) == [carried, joined]
        # a newer plain read of the side takes its place, as itself
        plain = seen("ann@example.com", "dynamics", False, at=9, version=11)
        await store.park_observations([plain])
        assert await store.parked_observations("acme", ["ann@example.com"]) == [carried, plain]


def placed(observation: Observation, *, offset_s: float, bounded_at: int | None = None,
           epoch: int = 1) -> Observation:
    return observation.placed(
        offset=timedelta(seconds=offset_s), uncertainty=timedelta(milliseconds=250),
        bounded_time=None if bounded_at is None else T + timedelta(seconds=bounded_at),
        clock_epoch=epoch)


def placed_now(observation: Observation) -> Observation:
    """How a reconciler would place a row that kept no placement, as the tests see it."""
    return placed(observation, offset_s=99, epoch=7)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_an_observation_is_taken_back_placed_as_when_it_was_read(backend: str,
                                                                       tmp_path: Path) -> None:
    # Placed again when taken back, a stamp beyond the future bound would be bounded by the
    # later time, and look newer than what the other side said while the contact was
    # suppressed.
    async with store_url(backend, tmp_path) as url, open_store(url) as store:
        future = placed(seen("ann@example.com", "dynamics", True, at=3600, version=10),
                        offset_s=-2.5, bounded_at=5)
        plain = placed(seen("ann@example.com", "dotdigital", False, at=7), offset_s=0.75,
                       epoch=0)
        await store.park_observations([future, plain])
        parked = await store.parked_observations("acme", ["ann@example.com"],
                                                 unplaced=placed_now)
        assert parked == [plain, future]
        assert [(o.offset, o.uncertainty, o.bounded_time, o.clock_epoch) for o in parked] == [
            (timedelta(seconds=0.75), timedelta(milliseconds=250), None, 0),
            (timedelta(seconds=-2.5), timedelta(milliseconds=250), T + timedelta(seconds=5), 1)]


_PARKED_BEFORE_PLACEMENTS = (
    "CREATE TABLE parked_observations (account TEXT NOT NULL, email TEXT NOT NULL, "
    "preference_id INTEGER NOT NULL, side TEXT NOT NULL, opted_in INTEGER NOT NULL, "
    "origin_time INTEGER NOT NULL, version INTEGER, change_id TEXT NOT NULL, "
    "carried INTEGER NOT NULL DEFAULT 0, joined INTEGER NOT NULL DEFAULT 0, "
    "PRIMARY KEY (account, email, preference_id, side))")


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_row_parked_before_placements_were_kept_is_placed_when_taken_back(
        backend: str, tmp_path: Path) -> None:
    old_row = ("acme", "ann@example.com", 1001, "dotdigital", 0,
               int((T.timestamp() + 7) * 1_000_000), None, "dotdigital:7", 0, 0)
    insert = ("INSERT INTO parked_observations (account, email, preference_id, side, opted_in, "
              "origin_time, version, change_id, carried, joined) VALUES")
    async with store_url(backend, tmp_path) as url:
        await make_old_table(backend, url, ddl=_PARKED_BEFORE_PLACEMENTS, insert=insert,
                             row=old_row)
        async with open_store(url) as store:
            old = seen("ann@example.com", "dotdigital", False, at=7)
            assert await store.parked_observations("acme", ["ann@example.com"],
                                                   unplaced=placed_now) == [placed_now(old)]
            # parked again now, it keeps its placement
            again = placed(seen("ann@example.com", "dotdigital", True, at=8), offset_s=1)
            await store.park_observations([again])
            assert await store.parked_observations("acme", ["ann@example.com"],
                                                   unplaced=placed_now) == [again]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_resubscriptions_are_marked_until_cleared(backend: str, tmp_path: Path) -> None:
    async with store_url(backend, tmp_path) as url, open_store(url) as store:
        await store.mark_resuming("acme", ["Ann@example.com", "bob@example.com"])
        await store.mark_resuming("acme", ["ann@example.com"])  # again: still one mark
        await store.mark_resuming("other", ["carl@example.com"])
        assert await store.resuming_contacts("acme", ["ann@example.com", "carl@example.com",
                                                      "dora@example.com"]) == {"ann@example.com"}
        await store.clear_resuming("acme", ["ANN@example.com"])
        assert await store.resuming_contacts("acme", ["ann@example.com", "bob@example.com"]) == {
            "bob@example.com"}
        assert await store.resuming_contacts("other", ["carl@example.com"]) == {
            "carl@example.com"}
