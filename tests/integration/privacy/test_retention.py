"""History retention: rows past ``[store] history_days`` are pruned by one replica per account;
key states (registers, the write ledger) are never pruned."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from common.config import ConfigError, parse_config
from common.domain import PreferenceKey
from common.store import LedgerStore
from services.reconciler.retention import HistoryRetention, lease_name

from .ledger import PREFERENCES, T, history, hold

pytestmark = pytest.mark.anyio

ANN, BOB = "ann@example.com", "bob@example.com"
NOW = T + timedelta(days=1000)


def raw_config(**store: Any) -> dict[str, Any]:
    return {"broker": {"url": "amqp://127.0.0.1/"}, "store": {"url": "sqlite:///x.db", **store},
            "accounts": [{"id": "acme",
                          "dynamics": {"url": "http://d", "token_url": "http://d/t",
                                       "client_id": "c", "client_secret_env": "S"},
                          "dotdigital": {"url": "http://e", "api_user": "u",
                                         "password_env": "S"}}]}


def test_history_days_defaults_to_400_and_a_bad_value_names_the_key() -> None:
    assert parse_config(raw_config(), env={"S": "x"}).store.history_days == 400
    assert parse_config(raw_config(history_days=30), env={"S": "x"}).store.history_days == 30
    for bad in (0, -1, "400", 1.5):
        with pytest.raises(ConfigError) as info:
            parse_config(raw_config(history_days=bad), env={"S": "x"})
        assert str(info.value).startswith("store.history_days: "), info.value


async def aged_ledger(store: LedgerStore) -> None:
    """Ann's and Bob's history 500 days old (past 400), plus a row of Ann's 10 days old; an
    old row in another account too."""
    old, recent = NOW - timedelta(days=500), NOW - timedelta(days=10)
    await hold(store, account="acme", email=ANN, record="rec-ann", recorded=old)
    await hold(store, account="acme", email=BOB, record="rec-bob", recorded=old)
    await hold(store, account="other", email=ANN, record="rec-ann", recorded=old)
    key = PreferenceKey(account="acme", email=ANN, preference_id=PREFERENCES[0])
    await store.save([], history=[history(key, "stale", recent)])


async def test_prune_history_removes_old_rows_in_batches_and_keeps_key_states(
        store: LedgerStore) -> None:
    await aged_ledger(store)
    states = await store.states_for_email("acme", ANN)
    before = NOW - timedelta(days=400)
    old_rows = 2 * (len(PREFERENCES) + 1)
    assert await store.prune_history("acme", before=before, limit=4) == 4
    assert await store.prune_history("acme", before=before, limit=4) == old_rows - 4
    assert await store.prune_history("acme", before=before, limit=4) == 0

    (kept,) = await store.history("acme", ANN)
    assert kept.decision == "stale"  # the recent row
    assert await store.history("acme", BOB) == []
    assert await store.states_for_email("acme", ANN) == states  # registers and write ledger
    assert len(await store.states_for_email("acme", BOB)) == len(PREFERENCES)
    assert len(await store.history("other", ANN)) == len(PREFERENCES) + 1  # another account


async def test_one_replica_prunes_each_account(store: LedgerStore) -> None:
    await aged_ledger(store)

    def replica(holder: str) -> HistoryRetention:
        return HistoryRetention(store=store, accounts=["acme", "other"], days=400,
                                holder=holder, batch=3, now=lambda: NOW)

    first, second = replica("replica-1"), replica("replica-2")
    assert await first.prune_once() == {"acme": 6, "other": 3}
    assert await second.prune_once() == {}  # the first holds both leases for the interval
    assert await store.lease_holder(lease_name("acme")) == "replica-1"
    assert await first.prune_once() == {"acme": 0, "other": 0}  # its own lease: renewed
    assert [h.decision for h in await store.history("acme", ANN)] == ["stale"]
    assert len(await store.states_for_email("acme", ANN)) == len(PREFERENCES)
    assert len(await store.states_for_email("other", ANN)) == len(PREFERENCES)
