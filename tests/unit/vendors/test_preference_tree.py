"""dotdigital's preference tree, read at most once per run and only when it may have changed
(common.vendors.dotdigital.tree), against the dotdigital simulator and a SQLite ledger."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from common.store import open_store
from common.store.checkpoints import PREFERENCE_TREE_READ_AT
from common.vendors.dotdigital.client import DotdigitalClient
from common.vendors.dotdigital.tree import mark_stale, tree_for_run
from tests.unit.vendors.support import DD_ACCOUNT, Events, dotdigital_config, dotdigital_sim

pytestmark = pytest.mark.anyio

TREE = "GET /v2/preferences"
ACCOUNT = "acme"


async def test_the_tree_is_read_only_when_it_may_have_changed(tmp_path: Path) -> None:
    events = Events()
    async with dotdigital_sim() as sim, open_store(f"sqlite:///{tmp_path}/ledger.db") as store:
        await sim.seed(records=4, preferences=3, seed=5, account=DD_ACCOUNT)
        async with DotdigitalClient(config=dotdigital_config(sim.url),
                                    on_request=events) as client:

            async def reads(**run: object) -> int:
                before = len([e for e in events.seen if e.endpoint == TREE])
                await tree_for_run(client=client, store=store, account=ACCOUNT,
                                   max_age_s=600.0, **run)  # type: ignore[arg-type]
                return len([e for e in events.seen if e.endpoint == TREE]) - before

            assert await reads(run_id="r1") == 1                  # rule 4: never read
            assert await reads(run_id="r2", covers=("r1",)) == 0  # rule 1: this run's read
            assert await reads(run_id="r3") == 0                  # rule 2: younger than 600 s
            assert await reads(run_id="r4", full_read=True) == 1  # rule 3: a full read
            await PREFERENCE_TREE_READ_AT.set(store, ACCOUNT,
                                              datetime.now(UTC) - timedelta(seconds=601))
            assert await reads(run_id="r5") == 1                  # rule 2: too old
            assert await reads(run_id="r6") == 0
            await mark_stale(store=store, account=ACCOUNT)
            assert await reads(run_id="r7") == 1                  # rule 4: marked stale
            # rule 5: what was read is what the next runs get
            assert await tree_for_run(client=client, store=store, account=ACCOUNT,
                                      run_id="r8", max_age_s=600.0) == await client.preferences()
