"""Reading rows: collection pages, counts, change-tracking deltas and row shaping.

Paging is keyset-based: a page starts after the last row of the previous one in the query's
order (primary key by default). Ordered walks use the key index, or the ``modifiedon`` index for
``$orderby=modifiedon[,<key>]``; an index plan narrows candidates first when the filter allows.
Only other orderings, and filters no index helps with, fall back to scanning.
"""

from __future__ import annotations

import fnmatch
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import total_ordering
from itertools import islice
from typing import Any

from .odata import Expand, KeysPlan, QueryOptions, RangePlan
from .schema import TABLES, Column, Kind, TableSchema
from .store import Row, Store, Table

MAX_COUNT = 5000
# Index plans yielding more candidates than this walk the ordered index instead of sorting them.
SORT_LIMIT = 50_000
_LOW, _HIGH = "", "\uffff"  # sort below / above every id


@total_ordering
class _Desc:
    __slots__ = ("v",)

    def __init__(self, v: Any) -> None:
        self.v = v

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.v == other.v

    def __lt__(self, other: _Desc) -> bool:
        return bool(other.v < self.v)

    def __hash__(self) -> int:
        return hash(self.v)


def full_order(opts: QueryOptions, schema: TableSchema) -> list[tuple[str, bool]]:
    """The query's ordering with the primary key appended as the tie-breaker."""
    order = list(opts.orderby)
    if not any(c == schema.pk for c, _ in order):
        order.append((schema.pk, order[-1][1] if order else False))
    return order


def sort_key(order: list[tuple[str, bool]]) -> Callable[[Row], tuple[Any, ...]]:
    def key(row: Row) -> tuple[Any, ...]:
        parts: list[Any] = []
        for col, desc in order:
            v = row.get(col)
            part = (0, "") if v is None else (1, v.lower() if isinstance(v, str) else v)
            parts.append(_Desc(part) if desc else part)
        return tuple(parts)
    return key


@dataclass
class Source:
    """Where a query's rows come from: a table, or some of its ids (a list's members)."""

    table: Table
    ids: Any = None  # a SortedSet of ids, or None for the whole table

    @property
    def ordered_ids(self) -> Any:
        return self.table.order if self.ids is None else self.ids

    @property
    def any_order_ids(self) -> Any:
        """The ids, in no particular order (for who sorts or counts them anyway)."""
        return self.table.rows if self.ids is None else self.ids

    def __len__(self) -> int:
        # (not len(ordered_ids): a count needs no key order, which may have to be built)
        return len(self.table.rows) if self.ids is None else len(self.ids)


def _candidates(source: Source, opts: QueryOptions) -> set[str] | None:
    plan = opts.filter.plan if opts.filter else None
    table = source.table
    ids: set[str] | None = None
    if isinstance(plan, KeysPlan):
        pk, rows = table.schema.pk, table.rows
        found = [({key} if key in rows else set()) if col == pk
                 else table.index(col).get(key, set()) for col, key in plan.pairs]
        if sum(len(f) for f in found) > SORT_LIMIT:
            return None
        ids = set().union(*found)
    elif isinstance(plan, RangePlan):
        lo, hi = _range_bounds(plan)
        bm = table.by_modified
        if bm.count(lo, hi) > SORT_LIMIT:
            return None
        ids = set(bm.ids(lo, hi))
    if ids is None or len(ids) > SORT_LIMIT:
        return None
    if source.ids is not None:
        ids = {i for i in ids if i in source.ids}
    return ids


def _range_bounds(plan: RangePlan | None) -> tuple[tuple[Any, str], tuple[Any, str]]:
    lo_dt = plan.lo if plan and plan.lo is not None else datetime.min.replace(tzinfo=UTC)
    hi_dt = plan.hi if plan and plan.hi is not None else datetime.max.replace(tzinfo=UTC)
    lo = (lo_dt, _LOW if plan is None or plan.lo_incl else _HIGH)
    hi = (hi_dt, _HIGH if plan is None or plan.hi_incl else _LOW)
    return lo, hi


def select_rows(source: Source, opts: QueryOptions, *, limit: int,
                after: list[Any] | None) -> tuple[list[Row], bool]:
    """Up to ``limit`` matching rows after keyset ``after``; and whether more follow."""
    table = source.table
    schema = table.schema
    rows = table.rows
    pred = opts.filter.predicate if opts.filter else None
    order = full_order(opts, schema)
    cands = _candidates(source, opts)
    stream: Iterable[Row]
    if len(order) == 1:  # primary key only
        desc = order[0][1]
        last = after[0] if after else None
        ids: Iterable[str]
        if cands is not None:
            ordered = sorted(cands, reverse=desc)
            if last is not None:
                pos = (bisect_right(ordered, _Desc(last), key=_Desc) if desc
                       else bisect_right(ordered, last))
                ordered = ordered[pos:]
            ids = ordered
        elif desc:
            ids = source.ordered_ids.irange(maximum=last, inclusive=(True, False), reverse=True)
        else:
            ids = source.ordered_ids.irange(minimum=last, inclusive=(False, True))
        stream = (rows[i] for i in ids)
    elif (cands is None and source.ids is None and len(order) == 2 and order[0][0] == "modifiedon"
          and order[0][1] == order[1][1]):
        stream = _modified_walk(table, opts, desc=order[0][1], after=after)
    else:
        key = sort_key(order)
        pool = (rows[i] for i in (cands if cands is not None else source.any_order_ids))
        matching = sorted((r for r in pool if pred is None or pred(r)), key=key)
        if after is not None:
            start = bisect_right(matching, key(dict(zip([c for c, _ in order], after, strict=True))),
                                 key=key)
            matching = matching[start:]
        return matching[:limit], len(matching) > limit
    if pred is not None:
        stream = (r for r in stream if pred(r))
    got = list(islice(stream, limit + 1))
    return got[:limit], len(got) > limit


def _modified_walk(table: Table, opts: QueryOptions, *, desc: bool,
                   after: list[Any] | None) -> Iterator[Row]:
    plan = opts.filter.plan if opts.filter else None
    lo, hi = _range_bounds(plan if isinstance(plan, RangePlan) else None)
    inclusive = [True, True]
    if after is not None:
        mark = (after[0], after[1])
        if desc and mark < hi:
            hi, inclusive[1] = mark, False
        if not desc and mark > lo:
            lo, inclusive[0] = mark, False
    rows = table.rows
    for row_id in table.by_modified.ids(lo, hi, inclusive=(inclusive[0], inclusive[1]),
                                        reverse=desc):
        yield rows[row_id]


def count_rows(source: Source, opts: QueryOptions) -> int:
    """Matching rows, capped at 5000 as Dataverse caps ``@odata.count``."""
    if opts.filter is None:
        return min(len(source), MAX_COUNT)
    pred = opts.filter.predicate
    cands = _candidates(source, opts)
    ids: Iterable[str] = cands if cands is not None else source.any_order_ids
    rows = source.table.rows
    return sum(1 for _ in islice((i for i in ids if pred(rows[i])), MAX_COUNT))


FORMATTED = "OData.Community.Display.V1.FormattedValue"
LOOKUP_NAME = "Microsoft.Dynamics.CRM.lookuplogicalname"
NAV_NAME = "Microsoft.Dynamics.CRM.associatednavigationproperty"
_ALLOW = {"donotbulkemail", "donotemail"}  # "Do Not Allow" / "Allow" rather than "Yes" / "No"


def annotations_wanted(prefer: dict[str, str]) -> Callable[[str], bool] | None:
    """Which annotation terms ``Prefer: odata.include-annotations`` asks for, if any."""
    raw = prefer.get("odata.include-annotations")
    if raw is None:
        return None
    patterns = [p.strip() for p in raw.strip('"').split(",") if p.strip()]
    return lambda term: any(fnmatch.fnmatchcase(term, p) for p in patterns)


def _formatted(col: Column, value: Any, store: Store | None) -> str | None:
    if value is None:
        return None
    kind = col.kind
    if kind is Kind.CHOICE:
        return dict(col.choices).get(value)
    if kind is Kind.BOOL:
        if col.name in _ALLOW:
            return "Do Not Allow" if value else "Allow"
        return "Yes" if value else "No"
    if kind is Kind.DATETIME:
        hour = value.hour % 12 or 12
        return (f"{value.month}/{value.day}/{value.year} {hour}:{value.minute:02d} "
                f"{'PM' if value.hour >= 12 else 'AM'}")
    if kind is Kind.LOOKUP and col.target and store is not None:
        target = store.tables[col.target]
        other = target.rows.get(value)
        return other.get(target.schema.primary_name) if other is not None else None
    return None


def _annotate(out: dict[str, Any], schema: TableSchema, wanted: Callable[[str], bool],
              store: Store | None) -> None:
    formatted, lookup_name, nav_name = wanted(FORMATTED), wanted(LOOKUP_NAME), wanted(NAV_NAME)
    for name in list(out):
        col = schema.columns.get(name)
        if col is None:
            continue
        value = out[name]
        if formatted:
            text = _formatted(col, value, store)
            if text is not None:
                out[f"{name}@{FORMATTED}"] = text
        if col.kind is Kind.LOOKUP and value is not None and col.target:
            if nav_name:
                out[f"{name}@{NAV_NAME}"] = name[1:-len("_value")]
            if lookup_name:
                out[f"{name}@{LOOKUP_NAME}"] = TABLES[col.target].logical


def shape(row: Row, schema: TableSchema, select: list[str] | None,
          expand: list[Expand] | None = None, store: Store | None = None,
          annotate: Callable[[str], bool] | None = None, *, context: str | None = None,
          etag: str | None = None) -> dict[str, Any]:
    """A row as the Web API returns it: etag, the selected columns, the key, expansions;
    first the ``@odata.context`` when given (``etag``: the row's, when the caller has it)."""
    etag = etag or f'W/"{row["versionnumber"]}"'
    out: dict[str, Any] = ({"@odata.etag": etag} if context is None
                           else {"@odata.context": context, "@odata.etag": etag})
    if select is None:
        for col in schema.columns:
            out[col] = row.get(col)
    else:
        for col in select:
            out[col] = row.get(col)
        out[schema.pk] = row[schema.pk]
    if annotate is not None:
        _annotate(out, schema, annotate, store)
    for exp in expand or ():
        ref = row.get(exp.column)
        target = store.tables[exp.target.entity_set].rows.get(ref) if store and ref else None
        out[exp.nav] = (shape(target, exp.target, exp.select, store=store, annotate=annotate)
                        if target is not None else None)
    return out


def context_fragment(entity_set: str, select: list[str] | None,
                     expand: list[Expand] | None = None) -> str:
    parts = list(select or [])
    for exp in expand or ():
        parts.append(f"{exp.nav}({','.join(exp.select)})" if exp.select else f"{exp.nav}()")
    return f"{entity_set}({','.join(parts)})" if parts else entity_set


def delta_entries(table: Table, *, since: int, until: int, deleted_phase: bool,
                  after_version: int | None, limit: int) -> tuple[list[tuple[bool, int, str]], bool]:
    """Changed rows (version order), then deleted ones, in ``(since, until]``; one per row.

    Returns ``(is_deleted, version, id)`` entries and whether more follow.
    """
    out: list[tuple[bool, int, str]] = []
    phases = (True,) if deleted_phase else (False, True)
    for deleted in phases:
        index = table.deleted if deleted else table.changes
        start = since if after_version is None or deleted != deleted_phase else after_version
        for version, row_id in index.irange((start + 1, _LOW), (until, _HIGH)):
            if len(out) == limit:
                return out, True
            out.append((deleted, version, row_id))
        after_version = None
    return out, False
