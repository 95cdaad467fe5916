"""Dataverse simulator: a ``$filter`` on the primary key reads the row by its id, not by a scan.

The plan (``eq`` on the key, alone or or-ed with other keys or indexed columns, and-ed with
anything) must give exactly what a scan with the same filter gives: these tests read seeded
random filters over a seeded table both ways, every ordering and page, and counts.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from services.simulators.dynamics.odata import KeysPlan, QueryOptions, parse_options
from services.simulators.dynamics.reads import Source, count_rows, select_rows
from services.simulators.dynamics.schema import TABLES
from services.simulators.dynamics.store import Row, Store

SUBSCRIPTIONS = "psync_marketingpreferencesubscriptions"
PK = "psync_marketingpreferencesubscriptionid"
_ORDERS = ["", "modifiedon", "modifiedon desc", f"{PK} desc", "psync_status,modifiedon desc",
           f"modifiedon,{PK}"]


def _store(rng: random.Random) -> tuple[Store, list[str], list[str]]:
    store = Store()
    contacts = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(20)]
    start = datetime(2026, 3, 1, 12, tzinfo=UTC)
    rows: list[Row] = []
    for _ in range(rng.randrange(1, 120)):
        stamp = start + timedelta(seconds=rng.randrange(30))
        rows.append({PK: str(uuid.UUID(int=rng.getrandbits(128))), "psync_name": None,
                     "psync_status": 100000000 + rng.randrange(2),
                     "_psync_preferenceid_value": contacts[rng.randrange(3)],
                     "_psync_contactid_value": rng.choice(contacts),
                     "_psync_leadid_value": None, "_psync_accountid_value": None,
                     "statecode": 0, "statuscode": 1, "createdon": stamp, "modifiedon": stamp,
                     "versionnumber": store.next_version()})
    store.tables[SUBSCRIPTIONS].bulk_load(rows)
    return store, [r[PK] for r in rows], contacts


def _term(rng: random.Random, ids: list[str], contacts: list[str]) -> str:
    roll = rng.random()
    if roll < 0.5:  # the key: a row's, an unknown one, or a row's written in capitals
        key = rng.choice(ids) if rng.random() < 0.7 else str(uuid.UUID(int=rng.getrandbits(128)))
        return f"{PK} eq {key.upper() if rng.random() < 0.2 else key}"
    if roll < 0.7:
        return f"_psync_contactid_value eq {rng.choice(contacts)}"
    if roll < 0.85:
        return f"psync_status eq {100000000 + rng.randrange(2)}"
    return f"{PK} ne {rng.choice(ids)}"


def _filter(rng: random.Random, ids: list[str], contacts: list[str]) -> str:
    text = _term(rng, ids, contacts)
    for _ in range(rng.randrange(3)):
        text = f"({text}) {rng.choice(['and', 'or'])} {_term(rng, ids, contacts)}"
    return text


def _pages(source: Source, opts: QueryOptions, size: int) -> list[list[str]]:
    """Every page of the query, by ids, as paging reads them (after each page's last row)."""
    schema = source.table.schema
    order = [c for c, _ in opts.orderby]
    if PK not in order:
        order.append(PK)
    pages: list[list[str]] = []
    after = None
    while True:
        rows, more = select_rows(source, opts, limit=size, after=after)
        pages.append([r[schema.pk] for r in rows])
        if not more:
            return pages
        after = [rows[-1][c] for c in order]


@pytest.mark.parametrize("seed", range(4))
def test_key_filters_read_as_a_scan_does(seed: int) -> None:
    rng = random.Random(seed)
    schema = TABLES[SUBSCRIPTIONS]
    planned = 0
    for _ in range(30):
        store, ids, contacts = _store(rng)
        source = Source(store.tables[SUBSCRIPTIONS])
        for _ in range(15):
            query = {"$filter": _filter(rng, ids, contacts)}
            if order := rng.choice(_ORDERS):
                query["$orderby"] = order
            opts = parse_options(query, schema, related=lambda _s, _i: None)
            assert opts.filter is not None
            if isinstance(opts.filter.plan, KeysPlan) and any(
                    c == PK for c, _ in opts.filter.plan.pairs):
                planned += 1
            scan = replace(opts, filter=replace(opts.filter, plan=None))
            size = rng.choice([1, 2, 5, 500])
            assert _pages(source, opts, size) == _pages(source, scan, size), query
            assert count_rows(source, opts) == count_rows(source, scan), query
    assert planned > 150  # many filters went through the key plan


def test_a_key_filter_finds_the_row_without_building_the_key_order() -> None:
    store, ids, _ = _store(random.Random(1))
    table = store.tables[SUBSCRIPTIONS]
    opts = parse_options({"$filter": f"{PK} eq {ids[0]}"}, TABLES[SUBSCRIPTIONS],
                         related=lambda _s, _i: None)
    assert opts.filter is not None and opts.filter.plan == KeysPlan(pairs=((PK, ids[0]),))
    rows, more = select_rows(Source(table), opts, limit=10, after=None)
    assert [r[PK] for r in rows] == [ids[0]] and not more
    assert table._order is None  # no walk of the whole table in key order
