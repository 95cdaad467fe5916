"""The preference catalog: dotdigital's preferences and categories, mirrored into Dynamics.

Each account's tree (``GET /v2/preferences``) is mirrored into ``psync_marketingpreferences``,
one row per category or preference, keyed by (``psync_ecaccount`` = our account id,
``psync_ecpreferenceid``): names, public or private, category, order. A rename follows; a
preference or category deleted in dotdigital is deactivated (statecode 1), never deleted, so
the subscription rows that point at it keep their history. Rows of other accounts are never
touched: each account's catalog is its own.

The dynamics-poller keeps the account's catalog rows in the store, brought up to date at the
start of every run by change tracking (:func:`read_catalog`: one call answering nothing when
nothing changed), mirrors the tree against them (writes only what differs) and keeps the mapping
(Dynamics row id -> dotdigital id, active rows only) that resolves subscription rows; the
reconciler and the writer read that mapping from the store.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.store.checkpoints import CATALOG, CATALOG_ROWS, PREFERENCE_TREE, dynamics_delta
from common.store.interface import Checkpoints
from common.vendors.dataverse.client import (
    BatchOperation,
    BatchResult,
    DataverseClient,
    DeltaTokenExpired,
)

log = logging.getLogger("prefsync.catalog")

PREFERENCES = "psync_marketingpreferences"
PREFERENCE_KEY = "psync_marketingpreferenceid"
# Store checkpoints: the mapping the dynamics-poller read last, and dotdigital's tree as the
# ec-poller (or the dynamics-poller) read it last.
_NAME_LENGTH = 100  # the String columns' MaxLength
_COLUMNS = ("psync_name", "psync_publicname", "psync_ispublic", "psync_iscategory",
            "psync_ecpreferenceid", "psync_eccategoryid", "psync_order")
ROW_COLUMNS = (PREFERENCE_KEY, "psync_ecaccount", *_COLUMNS, "statecode", "statuscode")
ACTIVE, INACTIVE = 0, 1
# where the change tracking of the catalog table has got to (its delta link)
_TRACKING = dynamics_delta(PREFERENCES)
_STATUS = {ACTIVE: 1, INACTIVE: 2}


@dataclass(frozen=True, kw_only=True)
class CatalogEntry:
    """One node of dotdigital's preference tree (a category or a preference)."""

    preference_id: int
    category_id: int  # 0 at the top level
    name: str  # dotdigital's private (internal) name
    public_name: str
    is_public: bool
    is_category: bool
    order: int

    def row(self) -> dict[str, Any]:
        """The columns of its ``psync_marketingpreferences`` row (account and state aside)."""
        return {
            "psync_name": self.name[:_NAME_LENGTH],
            "psync_publicname": self.public_name[:_NAME_LENGTH],
            "psync_ispublic": self.is_public,
            "psync_iscategory": self.is_category,
            "psync_ecpreferenceid": self.preference_id,
            "psync_eccategoryid": self.category_id or None,
            "psync_order": self.order,
        }


def _order(value: Any) -> int:
    # dotdigital sends order as a string ("0")
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _entry(node: Mapping[str, Any], *, category_id: int) -> CatalogEntry:
    public = str(node.get("publicName") or node.get("privateName") or "")
    private = str(node.get("privateName") or public)
    return CatalogEntry(preference_id=int(node["id"]), category_id=category_id, name=private,
                        public_name=public, is_public=bool(node.get("isPublic")),
                        is_category=not node.get("isPreference"), order=_order(node.get("order")))


def entries_of_tree(tree: Sequence[Mapping[str, Any]]) -> list[CatalogEntry]:
    """Every category and preference of the tree, in display order (categories before their
    preferences)."""
    out: list[CatalogEntry] = []
    for node in sorted(tree, key=lambda n: (_order(n.get("order")), int(n["id"]))):
        out.append(_entry(node, category_id=0))
        children = node.get("preferences") or []
        for child in sorted(children, key=lambda n: (_order(n.get("order")), int(n["id"]))):
            out.append(_entry(child, category_id=int(node["id"])))
    return out


@dataclass
class MirrorResult:
    created: int = 0
    updated: int = 0
    deactivated: int = 0
    failed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"created": self.created, "updated": self.updated,
                "deactivated": self.deactivated, "failed": len(self.failed)}


def _differs(row: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    return {column: value for column, value in wanted.items() if row.get(column) != value}


def plan_mirror(*, account: str, tree: Sequence[Mapping[str, Any]],
                rows: Sequence[Mapping[str, Any]]) -> list[BatchOperation]:
    """The writes that make ``rows`` (this account's catalog rows) mirror ``tree``."""
    entries = {e.preference_id: e for e in entries_of_tree(tree)}
    by_id: dict[int, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row.get("psync_ecpreferenceid") is not None:
            by_id.setdefault(int(row["psync_ecpreferenceid"]), []).append(row)
    operations: list[BatchOperation] = []
    for preference_id, entry in entries.items():
        existing = sorted(by_id.pop(preference_id, []),
                          key=lambda r: (int(r.get("statecode") or 0), str(r[PREFERENCE_KEY])))
        wanted = {**entry.row(), "statecode": ACTIVE, "statuscode": _STATUS[ACTIVE]}
        if not existing:
            operations.append(BatchOperation.create(PREFERENCES, {
                **entry.row(), "psync_ecaccount": account}))
            continue
        keep, duplicates = existing[0], existing[1:]
        changes = _differs(keep, wanted)
        if changes:
            operations.append(BatchOperation.update(PREFERENCES, str(keep[PREFERENCE_KEY]),
                                                    changes))
        # two rows for one preference (made by hand): the extra ones are retired
        by_id.setdefault(preference_id, []).extend(duplicates)
    for gone in by_id.values():
        for row in gone:
            if int(row.get("statecode") or 0) != INACTIVE:
                operations.append(BatchOperation.update(
                    PREFERENCES, str(row[PREFERENCE_KEY]),
                    {"statecode": INACTIVE, "statuscode": _STATUS[INACTIVE]}))
    return operations


async def read_catalog(client: DataverseClient, store: Checkpoints, *, account: str,
                       page_size: int | None = None) -> list[dict[str, Any]]:
    """This account's catalog rows (active and inactive), as kept in the store and brought up
    to date by the table's change tracking: when nothing changed, one call that answers no
    rows. The first read, or one after the delta link expired, reads the whole table."""
    cursor = await _TRACKING.get(store, account)
    kept = await CATALOG_ROWS.get(store, account) if cursor is not None else None
    if kept is None:
        cursor = None  # nothing kept to apply changes to: read it all
    try:
        return await _follow(client, store, account=account, cursor=cursor,
                             rows=_by_key(kept or []), page_size=page_size)
    except DeltaTokenExpired:
        log.warning("delta token expired; reading the preference catalog again in full",
                    extra={"account": account})
        return await _follow(client, store, account=account, cursor=None, rows={},
                             page_size=page_size)


async def _follow(client: DataverseClient, store: Checkpoints, *, account: str,
                  cursor: str | None, rows: dict[str, dict[str, Any]],
                  page_size: int | None) -> list[dict[str, Any]]:
    # Change tracking refuses $filter: every account's rows come, this account's are kept.
    mine = account.casefold()
    async for page in client.iter_changes(PREFERENCES, select=ROW_COLUMNS, cursor=cursor,
                                          page_size=page_size):
        for row in page.rows:
            key = str(row[PREFERENCE_KEY])
            if str(row.get("psync_ecaccount") or "").casefold() == mine:
                rows[key] = {column: row.get(column) for column in ROW_COLUMNS}
            else:
                rows.pop(key, None)  # (moved to another account)
        for gone in page.deleted_ids:
            rows.pop(gone, None)
        # the rows before the link: a crash in between reads these changes again
        await CATALOG_ROWS.set(store, account, list(rows.values()))
        await _TRACKING.set(store, account, page.cursor)
    return list(rows.values())


def _by_key(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(row[PREFERENCE_KEY]): dict(row) for row in rows}


async def mirror_catalog(*, client: DataverseClient, account: str,
                         tree: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
                         apply: bool = True) -> tuple[MirrorResult, list[dict[str, Any]]]:
    """Make this account's catalog ``rows`` in Dynamics mirror dotdigital's ``tree``: what it
    wrote, and the rows as they are after it (no call when nothing differs). With
    ``apply=False`` (a dry run), count what it would write and write nothing."""
    operations = plan_mirror(account=account, tree=tree, rows=rows)
    result = MirrorResult()
    after = _by_key(rows)
    if not operations:
        return result, list(after.values())
    if not apply:
        for operation in operations:
            _count(result, operation)
        return result, list(after.values())
    answers = await client.batch(operations, change_set=False, continue_on_error=True)
    for operation, answer in zip(operations, answers, strict=True):
        if not answer.ok:
            result.failed.append(f"{operation.method} {operation.path}: {answer.error}")
        else:
            _count(result, operation)
            _written(after, operation, answer)
    if result.failed:
        log.error("preference catalog: %d write(s) refused", len(result.failed),
                  extra={"account": account, "first": result.failed[0][:300]})
    return result, list(after.values())


def _written(rows: dict[str, dict[str, Any]], operation: BatchOperation,
             answer: BatchResult) -> None:
    """Apply one accepted write to ``rows`` (the next change-tracking read brings the same)."""
    body = dict(operation.body or {})
    if operation.method == "POST":
        if answer.entity_id is None:
            return  # not known: the next read brings it
        key = answer.entity_id
        rows[key] = dict.fromkeys(ROW_COLUMNS) | body | {
            PREFERENCE_KEY: key, "statecode": ACTIVE, "statuscode": _STATUS[ACTIVE]}
        return
    key = operation.path.removeprefix(f"{PREFERENCES}(").removesuffix(")")
    if key in rows:
        rows[key].update(body)


def _count(result: MirrorResult, operation: BatchOperation) -> None:
    if operation.method == "POST":
        result.created += 1
    elif operation.body is not None and operation.body.get("statecode") == INACTIVE:
        result.deactivated += 1
    else:
        result.updated += 1


def mapping_of(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Dynamics row id -> dotdigital id, for the active rows."""
    return {str(row[PREFERENCE_KEY]): int(row["psync_ecpreferenceid"]) for row in rows
            if row.get("psync_ecpreferenceid") is not None
            and int(row.get("statecode") or 0) == ACTIVE}


async def load_catalog(store: Checkpoints, account: str) -> dict[int, str]:
    """dotdigital preference id -> Dynamics row id, as the dynamics-poller read it last."""
    return catalog_of(await CATALOG.get_or(store, account, {}))


def catalog_of(mapping: Mapping[str, Any] | None) -> dict[int, str]:
    """:func:`load_catalog` of the :data:`~common.store.checkpoints.CATALOG` checkpoint's
    value as read (None: never set)."""
    return {int(dotdigital_id): row_id for row_id, dotdigital_id in (mapping or {}).items()}


async def load_tree(store: Checkpoints, account: str) -> list[dict[str, Any]]:
    """dotdigital's preference tree as last read (empty before the first run)."""
    return await PREFERENCE_TREE.get_or(store, account, [])
