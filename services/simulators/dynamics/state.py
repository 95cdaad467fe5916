"""Saving and loading the simulator's data (``--state FILE``), as orjson."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

from ..base import parse_time
from .schema import LIST_MEMBER_TYPES, TABLES, Kind
from .store import LISTMEMBERS, Store, listmember_row

FORMAT = 1


def dump(store: Store) -> bytes:
    return orjson.dumps({
        "format": FORMAT,
        "version": store.version,
        "tables": {name: {"rows": list(t.rows.values()), "tombstones": t.tombstones}
                   for name, t in store.tables.items()},
        "members": {lid: list(ids) for lid, ids in store.members.items()},
    }, option=orjson.OPT_UTC_Z)


def load(store: Store, raw: bytes) -> None:
    data: dict[str, Any] = orjson.loads(raw)
    if data.get("format") != FORMAT:
        raise ValueError(f"unknown state format {data.get('format')!r}")
    store.clear()
    for name, content in data["tables"].items():
        table = store.tables[name]
        stamps = [c.name for c in table.schema.columns.values() if c.kind is Kind.DATETIME]
        rows = content["rows"]
        for row in rows:
            for col in stamps:
                if row.get(col) is not None:
                    row[col] = parse_time(row[col])
        table.bulk_load(rows, {k: int(v) for k, v in content["tombstones"].items()})
    store.load_members(data["members"])
    store.version = int(data["version"])
    if not data["tables"].get(LISTMEMBERS):
        _listmembers_of(store)


def _listmembers_of(store: Store) -> None:
    """The ``listmember`` rows of a state saved before they were kept: one per membership,
    stamped as created with its list."""
    lists = store.tables["lists"].rows
    rows = []
    for list_id, members in store.members.items():
        owner = lists.get(list_id)
        if owner is None:
            continue
        kind = TABLES[LIST_MEMBER_TYPES[owner["createdfromcode"]]].logical
        for member_id in members:
            rows.append(listmember_row(list_id, member_id, kind, at=owner["createdon"],
                                       version=store.next_version()))
    store.tables[LISTMEMBERS].bulk_load(rows)


def save_file(store: Store, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(dump(store))
    os.replace(tmp, path)


def load_file(store: Store, path: Path) -> bool:
    if not path.exists():
        return False
    load(store, path.read_bytes())
    return True
