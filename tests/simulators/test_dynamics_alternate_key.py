"""Dataverse simulator: the subscriptions' alternate key (record, preference) under any writes.

A write's key is computed once, by the rule check, and the store files the row under it. A
seeded random workload of creates, updates (status, or moving a row to another record or
preference), deletes and rolled-back change sets, straight through ``Writes``, checks after
every step that the key map is exactly the live rows' keys, and that a duplicate is refused.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from services.simulators.dynamics.app import build
from services.simulators.dynamics.protocol import DUPLICATE_RECORD, ApiError
from services.simulators.dynamics.schema import TABLES

SUBSCRIPTIONS = TABLES["psync_marketingpreferencesubscriptions"]
PK = SUBSCRIPTIONS.pk


@pytest.mark.parametrize("seed", range(4))
def test_the_key_map_holds_the_live_rows_keys(seed: int) -> None:
    rng = random.Random(seed)
    sim, _ = build(clients=[], state_file=None, retention=timedelta(days=7),
                   token_lifetime_s=3600, limits=None)
    sim.seed({"records": 12, "preferences": 3, "seed": seed, "states": "sample"})
    store, writes = sim.store, sim.api.writes
    writes.now = lambda: datetime(2026, 12, 5, 3, tzinfo=UTC)
    table = store.tables[SUBSCRIPTIONS.entity_set]
    prefs = [i for i, r in store.tables["psync_marketingpreferences"].rows.items()
             if not r.get("psync_iscategory")]
    records = ([("contact", "contacts", i) for i in store.tables["contacts"].rows]
               + [("lead", "leads", i) for i in store.tables["leads"].rows
                  if store.tables["leads"].rows[i]["statecode"] == 0])
    duplicates = 0
    for _ in range(600):
        kind, entity_set, record = rng.choice(records)
        binds = {f"psync_{kind}id@odata.bind": f"/{entity_set}({record})",
                 "psync_preferenceid@odata.bind":
                     f"/psync_marketingpreferences({rng.choice(prefs)})"}
        rows = sorted(table.rows)
        roll = rng.random()
        try:
            with store.atomic():
                if roll < 0.4 or not rows:
                    writes.create(SUBSCRIPTIONS, {"psync_status": 100000000, **binds})
                elif roll < 0.6:
                    writes.update(SUBSCRIPTIONS, rng.choice(rows),
                                  {"psync_status": 100000000 + rng.randrange(2)})
                elif roll < 0.85:  # another record and preference: the key moves
                    others = {f"psync_{k}id@odata.bind": None for k in ("contact", "lead")
                              if k != kind}
                    writes.update(SUBSCRIPTIONS, rng.choice(rows), {**binds, **others})
                else:
                    writes.delete(SUBSCRIPTIONS, rng.choice(rows))
                if rng.random() < 0.1:
                    raise RuntimeError("the change set fails: all of it is undone")
        except ApiError as exc:
            if exc.code == DUPLICATE_RECORD:
                duplicates += 1
            else:
                assert exc.status == 400, exc.message  # a read-only record's preferences
        except RuntimeError:
            pass
        want = {table.unique_key(r): i for i, r in table.rows.items()}
        assert len(want) == len(table.rows)  # no two live rows share a key
        assert table.unique == want
    assert duplicates > 20
