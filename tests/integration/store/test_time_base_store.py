"""What the time base keeps in the ledger, SQLite and PostgreSQL alike: registers and knowledge
placed in our time base, history with the corrected time (also in a ledger made before it had
that column), and each vendor's clock estimate, updated by several writers at once."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from common.domain import (
    HistoryEntry,
    KeyState,
    Known,
    OffsetSample,
    PerSide,
    Register,
)
from common.store import LedgerStore, open_store
from common.vendors.clock_skew import clock_status, load_time_base, record_samples
from tests.harness.keys import T, key

from .backends import make_old_table

pytestmark = pytest.mark.anyio

KEY = key()


async def test_a_state_placed_in_our_time_base_round_trips(store: LedgerStore) -> None:
    year = T + timedelta(days=365)
    state = KeyState(
        key=KEY,
        register=Register(opted_in=True, origin_time=year, origin_side="dotdigital",
                          change_id="dd:1", offset=timedelta(seconds=-30.25),
                          uncertainty=timedelta(microseconds=1500), bounded_time=T),
        known=PerSide(dynamics=Known(opted_in=False, as_of=T, version=3),
                      dotdigital=Known(opted_in=True, as_of=T, stamp=year)))
    await store.save([(None, state, None)])
    assert (await store.load([KEY]))[KEY] == replace(state, revision=1)


async def test_history_keeps_the_vendor_time_and_ours(store: LedgerStore) -> None:
    entries = [HistoryEntry(account="acme", email=KEY.email, preference_id=1001,
                            side="dotdigital", opted_in=True, origin_time=T + timedelta(seconds=30),
                            corrected_time=T, change_id="dd:1", decision=decision,
                            recorded_at=T + timedelta(seconds=i))
               for i, decision in enumerate(("future_timestamp", "applied"))]
    entries.append(replace(entries[0], decision="written", corrected_time=None,
                           recorded_at=T + timedelta(seconds=5)))
    await store.save([], history=entries)
    assert await store.history("acme", KEY.email) == entries


def _old_history_table() -> str:
    return ("CREATE TABLE history (id INTEGER PRIMARY KEY, account TEXT NOT NULL, "
            "email TEXT NOT NULL, preference_id INTEGER NOT NULL, side TEXT NOT NULL, "
            "opted_in INTEGER NOT NULL, origin_time INTEGER NOT NULL, change_id TEXT NOT NULL, "
            "decision TEXT NOT NULL, recorded_at INTEGER NOT NULL)")


async def test_a_ledger_made_before_the_corrected_time_gets_it(backend: str, url: str,
                                                               tmp_path: Path) -> None:
    """The history table of a ledger made before the time base lacks ``corrected_time``:
    opening it adds the column, and the rows it held read back without one."""
    old_row = ("acme", KEY.email, 1001, "dynamics", 1, 1_000_000, "dyn:1", "applied", 2_000_000)
    insert = ("INSERT INTO history (account, email, preference_id, side, opted_in, origin_time, "
              "change_id, decision, recorded_at) VALUES")
    await make_old_table(backend, url, ddl=_old_history_table(), insert=insert, row=old_row)
    for _ in range(2):  # and opening it again changes nothing more
        async with open_store(url) as store:
            (old,) = await store.history("acme", KEY.email)
            assert old.decision == "applied" and old.corrected_time is None
    async with open_store(url) as store:
        await store.save([], history=[replace(old, corrected_time=T,
                                              recorded_at=T + timedelta(days=1))])
        assert [h.corrected_time for h in await store.history("acme", KEY.email)] == [None, T]


def sample(offset_s: float, at_s: float) -> OffsetSample:
    return OffsetSample(at=T + timedelta(seconds=at_s), low_s=offset_s - 0.01,
                        high_s=offset_s + 0.01, source="server-time")


async def test_the_clock_estimate_is_kept_per_account_and_side(store: LedgerStore) -> None:
    assert (await load_time_base(store, account="acme")).estimates == {
        "dynamics": None, "dotdigital": None}
    await record_samples(store, account="acme", side="dotdigital",
                         samples=[sample(30, 0), sample(30.005, 60)])
    base = await load_time_base(store, account="acme")
    dotdigital = base.estimates["dotdigital"]
    assert dotdigital is not None and dotdigital.offset_s == pytest.approx(30.0025, abs=0.01)
    assert base.estimates["dynamics"] is None
    assert (await load_time_base(store, account="globex")).estimates["dotdigital"] is None
    # one outlier: kept among the suspects and in the history, the estimate as it was
    await record_samples(store, account="acme", side="dotdigital", samples=[sample(0, 120)])
    status = await clock_status(store, account="acme")
    assert status["dotdigital"] is not None
    assert status["dotdigital"]["offset_s"] == pytest.approx(dotdigital.offset_s)
    assert status["dotdigital"]["suspects"] == 1 and status["dotdigital"]["history"] == 3
    assert status["dynamics"] is None


async def test_writers_at_once_all_land(store: LedgerStore) -> None:
    """Pollers and writers of several processes add samples at once (compare-and-set)."""
    await asyncio.gather(*(record_samples(store, account="acme", side="dynamics",
                                          samples=[sample(-2, i)]) for i in range(8)))
    status = await clock_status(store, account="acme")
    assert status["dynamics"] is not None and status["dynamics"]["history"] == 8
