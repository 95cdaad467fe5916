"""Every checkpoint kept in the ledger store: its name, and the type of its value.

A checkpoint is a small text value per account and name (:class:`Checkpoints`). Each one the
services keep is declared here, once: a :class:`Checkpoint` pairs its name with the codec of
its value, so whoever writes it and whoever reads it agree on both. A family of checkpoints (one
per service, preference, side, ...) is a function that gives the member's checkpoint.

Two families keep a value whose codec belongs to the code that owns it: a preference's position
in dotdigital's opt-ins feed (:class:`common.vendors.dotdigital.feed.FeedPosition`) and a
vendor's clock estimate (:mod:`common.vendors.clock_skew`); their names are here all the same.

The names are stored: renaming one loses what was kept under the old name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

import orjson

from common.domain import Side
from common.store.interface import Checkpoints

T = TypeVar("T")


@dataclass(frozen=True)
class Codec(Generic[T]):
    """How a checkpoint's value is kept as text."""

    encode: Callable[[T], str]
    decode: Callable[[str], T]


def _json_object(raw: str) -> dict[str, Any]:
    value = orjson.loads(raw) if raw else {}
    return value if isinstance(value, dict) else {}


def _json_list(raw: str) -> list[Any]:
    value = orjson.loads(raw) if raw else []
    return value if isinstance(value, list) else []


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


TEXT: Codec[str] = Codec(encode=str, decode=str)
TIME: Codec[datetime] = Codec(encode=datetime.isoformat, decode=datetime.fromisoformat)
JSON_OBJECT: Codec[dict[str, Any]] = Codec(encode=_json, decode=_json_object)
JSON_LIST: Codec[list[Any]] = Codec(encode=_json, decode=_json_list)


@dataclass(frozen=True)
class Checkpoint(Generic[T]):
    """One named checkpoint (per account) and the codec of its value."""

    name: str
    codec: Codec[T]

    async def get(self, store: Checkpoints, account: str) -> T | None:
        """The value, or None when it was never set (or set empty)."""
        return self.of(await store.get_checkpoint(account, self.name))

    def of(self, raw: str | None) -> T | None:
        """The value of ``raw`` as read (in a batch's snapshot, say); None as :meth:`get`."""
        return self.codec.decode(raw) if raw else None

    async def get_or(self, store: Checkpoints, account: str, default: T) -> T:
        value = await self.get(store, account)
        return default if value is None else value

    async def set(self, store: Checkpoints, account: str, value: T) -> None:
        await store.set_checkpoint(account, self.name, self.codec.encode(value))

    async def clear(self, store: Checkpoints, account: str) -> None:
        """Set it empty: read back as None."""
        await store.set_checkpoint(account, self.name, "")

    async def update(self, store: Checkpoints, account: str,
                     change: Callable[[T | None], T], *,
                     attempts: int | None = None) -> T:
        """Read, change and write back with compare-and-set, again while another process
        changed it in between (at most ``attempts`` times; None: until it holds)."""
        tried = 0
        while attempts is None or tried < attempts:
            tried += 1
            raw = await store.get_checkpoint(account, self.name)
            updated = change(self.codec.decode(raw) if raw else None)
            if await store.swap_checkpoint(account, self.name, raw, self.codec.encode(updated)):
                return updated
        raise RuntimeError(f"checkpoint {self.name} of {account} kept changing under us")


# --- run control (services.runtime) ---------------------------------------------------------
# The account's status as ``prefsync status`` shows it (services.runtime.status).
STATUS = Checkpoint("status:run", JSON_OBJECT)
# The schedule set with ``prefsync schedule``, overriding the configured one (empty: none).
SCHEDULE = Checkpoint("schedule", TEXT)
# Asked once by readiness checks: the store answers (never set).
READINESS_PROBE = "readiness-probe"


def pending_runs(service: str) -> Checkpoint[list[Any]]:
    """The triggers a poller service has not run yet: ``[{run_id, emails, reason}]``."""
    return Checkpoint(f"{service}:pending", JSON_LIST)


def last_run(service: str) -> Checkpoint[datetime]:
    """When a poller service last finished (or failed) a run; schedules count from it."""
    return Checkpoint(f"{service}:last-run", TIME)


# --- what the dynamics-poller reads ---------------------------------------------------------
# Dynamics preference row id -> dotdigital preference id, for the active rows.
CATALOG = Checkpoint("dynamics:catalog", JSON_OBJECT)
# This account's catalog rows as last read (kept current by change tracking).
CATALOG_ROWS = Checkpoint("dynamics:catalog-rows", JSON_LIST)
# The email-activated marketing lists seen last (list id -> createdfromcode), the creation
# time from which list members are read next, and when every list was last read in full:
# ``{lists, members_since, read_in_full_at}``.
EMAIL_LISTS = Checkpoint("dynamics:email-lists", JSON_OBJECT)


def dynamics_delta(entity_set: str) -> Checkpoint[str]:
    """The change-tracking (delta) link of one Dataverse table."""
    return Checkpoint(f"dynamics:{entity_set}", TEXT)


# --- what the ec-poller reads ---------------------------------------------------------------
# dotdigital's preference tree, as last read.
PREFERENCE_TREE = Checkpoint("dotdigital:preferences", JSON_LIST)
# The run that read it (at its start): the ec-poller's part of that run reads it from here.
PREFERENCE_TREE_RUN = Checkpoint("dotdigital:preferences:run", TEXT)
# When it was read (our clock; empty: to be read again): common.vendors.dotdigital.tree.
PREFERENCE_TREE_READ_AT = Checkpoint("dotdigital:preferences:read-at", TIME)
# dotdigital's time at which the suppressions feed was last read from.
SUPPRESSED = Checkpoint("dotdigital:suppressed", TIME)
# dotdigital's time at which the contacts-modified read (resubscriptions) last began, and the
# time before which every contact modification was surely read: together, the ec-poller's
# common.vendors.dotdigital.modified.ModifiedPosition.
CONTACTS_MODIFIED = Checkpoint("dotdigital:contacts-modified", TIME)
CONTACTS_COVERED = Checkpoint("dotdigital:contacts-modified:covered", TIME)


def opt_ins_source(preference_id: int) -> str:
    """The checkpoint (and source) name of one preference's opt-ins feed; its value is a
    :class:`common.vendors.dotdigital.feed.FeedPosition`."""
    return f"dotdigital:opt-ins:{preference_id}"


def seen(source: str) -> Checkpoint[dict[str, Any]]:
    """What the ec-poller's last read of a feed published in the overlap the next read reads
    again (``{seen, seen_from}``)."""
    return Checkpoint(f"ec-poller:seen:{source}", JSON_OBJECT)


# --- the reconciler and the writer ------------------------------------------------------------
def reconciler_read_mark(preference_id: int, shard: int) -> str:
    """The reconciler's checkpoint saying it reconciled a complete read of the preference in
    this shard (set before it looks for the writes deferred until then); its value is the
    time it was set."""
    return f"reconciler:read:{preference_id}:{shard}"


# --- each vendor's clock (common.vendors.clock_skew keeps the codec) ---------------------------
CLOCK_PREFIX = "clock:"


def clock_name(side: Side) -> str:
    return f"{CLOCK_PREFIX}{side}"


# Checkpoints that hold data rather than a read position (no meaningful age).
NOT_POSITIONS = frozenset({CATALOG.name, CATALOG_ROWS.name, PREFERENCE_TREE.name,
                           PREFERENCE_TREE_RUN.name, PREFERENCE_TREE_READ_AT.name})
