"""Dataverse simulator: how a write's body keys are read (``Writes._changes``).

Each table reads a key the same way every time (a column's value, a lookup bound by
``@odata.bind``, an annotation or read-only column passed over, or a refusal), so the reading
is kept per table and key. Seeded random bodies of every kind of key, for several tables in
turn, must come out (changes or error) the same when read again as when read with nothing
kept.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

import pytest

from services.simulators.dynamics.protocol import ApiError
from services.simulators.dynamics.schema import TABLES
from services.simulators.dynamics.seed import seed_store
from services.simulators.dynamics.store import Store
from services.simulators.dynamics.writes import _KEY_PLANS, Writes


def _outcome(read: Any, *args: Any) -> Any:
    try:
        return ("changes", read(*args))
    except ApiError as exc:
        return ("error", exc.status, exc.code, exc.message)


@pytest.mark.parametrize("seed", range(3))
def test_body_keys_read_the_same_whether_their_reading_was_kept_or_not(seed: int) -> None:
    store = Store()
    seed_store(store, {"records": 8, "preferences": 3, "seed": 2}, now=datetime.now(UTC))
    writes = Writes(store, lambda: datetime(2026, 12, 4, tzinfo=UTC))
    rng = random.Random(seed)
    refs = [f"/{name}({row_id})" for name in ("contacts", "leads", "psync_marketingpreferences")
            for row_id in sorted(store.tables[name].rows)[:2]]
    refs += ["/contacts(00000000-0000-4000-8000-000000000001)", "nothing"]
    for _ in range(3000):
        schema = TABLES[rng.choice(["contacts", "leads", "psync_marketingpreferencesubscriptions",
                                    "lists"])]
        keys = [*rng.sample(sorted(schema.columns), 3), "nothing", "x@odata.type",
                "@odata.type", "statecode@OData.Community.Display.V1.FormattedValue"]
        keys += [f"{nav}@odata.bind" for nav in schema.lookups] + ["psync_nope@odata.bind"]
        body = {rng.choice(keys): rng.choice([None, True, 1, 7, 100000001, "x", *refs])
                for _ in range(rng.randrange(5))}
        kept = _outcome(writes._changes, schema, body)
        _KEY_PLANS.clear()
        assert _outcome(writes._changes, schema, body) == kept
        assert _outcome(writes._changes, schema, body) == kept
