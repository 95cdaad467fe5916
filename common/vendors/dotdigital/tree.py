"""dotdigital's preference tree as the pollers use it: read at most once per run, and only when
it may have changed.

The tree (categories and the preferences under them) tells the ec-poller which feeds to read
and the dynamics-poller what to mirror into the account's catalog. dotdigital has no feed of
tree changes, and the tree changes rarely (an administrator adds a preference), while on the
Low tier each read is one of 35 calls a minute. So:

1. A run whose tree was read already (the dynamics-poller reads it at the run's start, the
   ec-poller's part of the same run comes after) uses that read.
2. Otherwise the stored tree is used while it is younger than ``max_age_s`` (the account's
   ``preference_tree_max_age_s``): a preference added in dotdigital is picked up within that
   long, or at once by the daily full read.
3. A full read always reads it again.
4. A tree never read, or marked stale, is read: a feed that answers that its preference is gone
   marks it stale (:func:`mark_stale`).
5. A read stores the tree, when it was read (our clock: only its age is used) and the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from common.store.checkpoints import (
    PREFERENCE_TREE,
    PREFERENCE_TREE_READ_AT,
    PREFERENCE_TREE_RUN,
)
from common.store.interface import Checkpoints
from common.vendors.dotdigital.client import DotdigitalClient


async def tree_for_run(*, client: DotdigitalClient, store: Checkpoints, account: str,
                       run_id: str | None, covers: Sequence[str] = (), max_age_s: float,
                       full_read: bool = False) -> list[dict[str, Any]]:
    """The preference tree for this run (see the module's docstring)."""
    stored = await PREFERENCE_TREE.get(store, account)
    if stored is not None and not full_read:
        if covers and await PREFERENCE_TREE_RUN.get(store, account) in covers:
            return stored  # rule 1
        read_at = await PREFERENCE_TREE_READ_AT.get(store, account)
        if read_at is not None and 0 <= datetime.now(UTC).timestamp() - read_at.timestamp() < max_age_s:
            return stored  # rule 2
    tree = await client.preferences()  # rules 3 and 4
    await PREFERENCE_TREE.set(store, account, tree)
    await PREFERENCE_TREE_READ_AT.set(store, account, datetime.now(UTC))
    if run_id is not None:
        await PREFERENCE_TREE_RUN.set(store, account, run_id)
    return tree


async def mark_stale(*, store: Checkpoints, account: str) -> None:
    """The stored tree is out of date (rule 4): the next run reads it again."""
    await PREFERENCE_TREE_READ_AT.clear(store, account)
