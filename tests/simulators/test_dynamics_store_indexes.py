"""The row store's indexes agree with a plain sort of its rows under any mix of writes and reads.

A seeded random workload of creates, updates, deletes and rolled-back change sets, with reads
in key order, by ``modifiedon``, by version and by indexed column at random moments (so the key
order and hash indexes are built, kept, dropped and built again), each compared with a plain
sort or scan of the rows themselves.
"""

from __future__ import annotations

import random
import types
from bisect import bisect_left
from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.simulators.dynamics import sortedkeys
from services.simulators.dynamics.store import ModifiedIndex, Row, Store, Table

SUBSCRIPTIONS = "psync_marketingpreferencesubscriptions"
_LOW, _HIGH = "", "\uffff"
_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)


def _row(row_id: str, *, stamp: datetime, version: int, rng: random.Random) -> Row:
    return {"psync_marketingpreferencesubscriptionid": row_id, "psync_name": None,
            "psync_status": 100000000 + rng.randrange(2),
            "_psync_preferenceid_value": f"pref-{rng.randrange(3)}",
            "_psync_contactid_value": f"contact-{rng.randrange(50)}",
            "_psync_leadid_value": None, "_psync_accountid_value": None,
            "statecode": 0, "statuscode": 1, "createdon": stamp, "modifiedon": stamp,
            "versionnumber": version}


def _check_reads(table: Table, rng: random.Random, stamps: list[datetime]) -> None:
    rows = table.rows
    if rng.random() < 0.5:  # a key-order read now and then: built, kept, or dropped meanwhile
        assert list(table.order) == sorted(rows)
        last = rng.choice(sorted(rows)) if rows else None
        assert (list(table.order.irange(minimum=last, inclusive=(False, True)))
                == [i for i in sorted(rows) if last is None or i > last])
    for column in table.schema.indexed:
        if rng.random() < 0.3:  # a lookup now and then: the index built, kept, or dropped
            value = rng.choice([f"pref-{rng.randrange(3)}", f"CONTACT-{rng.randrange(50)}"])
            assert table.lookup(column, value) == {
                i for i, r in rows.items() if r[column] == value.lower()}
    assert list(table.changes) == sorted((r["versionnumber"], i) for i, r in rows.items())
    assert list(table.deleted) == sorted((v, i) for i, v in table.tombstones.items())
    # (counted before any read settles the newest second's entries, which wait apart)
    assert len(table.by_modified) == len(rows)
    by_modified = sorted((r["modifiedon"], i) for i, r in rows.items())
    bounds = [(s, tail) for s in stamps for tail in (_LOW, _HIGH)]
    bounds += [(s, i) for s, i in rng.sample(by_modified, min(3, len(by_modified)))]
    bounds += [(_EARLIEST, _LOW), (_LATEST, _HIGH)]
    for _ in range(6):
        lo, hi = rng.choice(bounds), rng.choice(bounds)
        inclusive = (rng.random() < 0.5, rng.random() < 0.5)
        reverse = rng.random() < 0.5
        want = [key[1] for key in by_modified
                if (lo < key or (inclusive[0] and lo == key))
                and (key < hi or (inclusive[1] and key == hi))]
        got = list(table.by_modified.ids(lo, hi, inclusive=inclusive, reverse=reverse))
        assert got == (want[::-1] if reverse else want)
        # (as a sorted list's bisections answer it: negative when the bounds are crossed)
        assert (table.by_modified.count(lo, hi)
                == bisect_left(by_modified, hi) - bisect_left(by_modified, lo))


@pytest.mark.parametrize("seed", range(4))
def test_a_random_workload_reads_as_sorted_rows(seed: int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # small sublists, so that the indexes split and join them often
    monkeypatch.setattr(sortedkeys, "LOAD", 8)
    monkeypatch.setattr(sortedkeys, "_SPLIT", 16)
    monkeypatch.setattr(sortedkeys, "_JOIN", 2)
    rng = random.Random(seed)
    store = Store()
    table = store.tables[SUBSCRIPTIONS]
    start = datetime(2026, 3, 1, 12, tzinfo=UTC)
    clock = start
    stamps = [start]
    seeded = [_row(f"{rng.getrandbits(64):016x}", stamp=start, version=store.next_version(),
                   rng=rng) for _ in range(rng.randrange(0, 300))]
    table.bulk_load(seeded, in_order=False)
    for step in range(1200):
        if rng.random() < 0.15:  # the clock moves on; at times a row is stamped in the past
            clock += timedelta(seconds=1)
            stamps.append(clock)
        stamp = clock if rng.random() < 0.9 else rng.choice(stamps)
        roll = rng.random()
        rows = list(table.rows)
        try:
            with store.atomic():
                if roll < 0.45 or not rows:
                    # a new id, or at times one deleted before (its tombstone goes)
                    row_id = (rng.choice(sorted(table.tombstones))
                              if table.tombstones and rng.random() < 0.2
                              else f"{rng.getrandbits(64):016x}")
                    store.put(SUBSCRIPTIONS, row_id,
                              _row(row_id, stamp=stamp, version=store.next_version(), rng=rng))
                elif roll < 0.8:
                    row_id = rng.choice(rows)
                    row = dict(table.rows[row_id], psync_status=100000001,
                               versionnumber=store.next_version())
                    if rng.random() < 0.8:
                        row["modifiedon"] = stamp
                    store.put(SUBSCRIPTIONS, row_id, row)
                else:
                    store.delete(SUBSCRIPTIONS, rng.choice(rows), store.next_version())
                if rng.random() < 0.1:
                    raise RuntimeError("the change set fails: all of it is undone")
        except RuntimeError:
            pass
        if step % 25 == 0:
            _check_reads(table, rng, stamps)
    _check_reads(table, rng, stamps)


def _kept(table: Table) -> set[str]:
    """The indexes the table keeps now ("" the key order)."""
    return set(table.indexes) | ({""} if table._order is not None else set())


def test_indexes_are_dropped_after_many_unread_writes_and_rebuilt_the_same() -> None:
    rng = random.Random(5)
    store = Store()
    table = store.tables[SUBSCRIPTIONS]
    at = datetime(2026, 3, 1, tzinfo=UTC)

    def create(count: int) -> None:
        for _ in range(count):
            row_id = f"{rng.getrandbits(64):016x}"
            store.put(SUBSCRIPTIONS, row_id,
                      _row(row_id, stamp=at, version=store.next_version(), rng=rng))

    create(10)
    assert _kept(table) == set()  # never read: never kept
    assert list(table.order) == sorted(table.rows)
    assert table.lookup("_psync_preferenceid_value", "PREF-1") == {
        i for i, r in table.rows.items() if r["_psync_preferenceid_value"] == "pref-1"}
    create(5)
    assert _kept(table) == {"", "_psync_preferenceid_value"}  # read lately: kept up to date
    assert list(table.order) == sorted(table.rows)
    create(1000)  # no read while the table grew from 15 rows to 1015: both dropped
    assert _kept(table) == set()
    assert list(table.order) == sorted(table.rows)
    assert table.lookup("_psync_preferenceid_value", "pref-2") == {
        i for i, r in table.rows.items() if r["_psync_preferenceid_value"] == "pref-2"}
    with pytest.raises(KeyError):
        table.lookup("psync_status", 100000000)  # not an indexed column


def test_modified_index_orders_as_stamp_then_id_tuples() -> None:
    early = datetime(2026, 1, 1, tzinfo=UTC)
    entries = [(early + timedelta(microseconds=m), i)
               for m in (0, 1, 999_999, 1_000_000, 86_400_000_000) for i in ("a", "b", "z9")]
    entries.append((datetime(1, 1, 1, tzinfo=UTC), "x"))
    entries.append((datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC), "y"))
    shuffled = list(entries)
    random.Random(1).shuffle(shuffled)
    index = ModifiedIndex(shuffled)
    assert list(index.ids((_EARLIEST, _LOW), (_LATEST, _HIGH))) == [i for _, i in sorted(entries)]
    # another offset, the same instant: the same place
    other = early.astimezone(timezone(timedelta(hours=2)))
    assert list(index.ids((other, _LOW), (other, _HIGH))) == ["a", "b", "z9"]


def test_modified_index_refuses_an_id_that_is_not_text() -> None:
    index = ModifiedIndex([(datetime(2026, 1, 1, tzinfo=UTC), "a")])
    with pytest.raises(TypeError):
        index.count((datetime(2026, 1, 1, tzinfo=UTC), None), (_LATEST, _HIGH))  # type: ignore[arg-type]


def _internals(table: Table) -> tuple[object, ...]:
    """Everything a table holds, its indexes and counts included."""
    return (list(table.rows.items()), list(table.changes), list(table.deleted),
            dict(table.tombstones), list(table.by_modified._keys), set(table.by_modified._pending),
            table.by_modified._newest, {c: dict(i) for c, i in table.indexes.items()},
            list(table.unique.items()), table._writes, dict(table._read_at),
            None if table._order is None else list(table._order))


@pytest.mark.parametrize("seed", range(3))
def test_a_new_row_is_stored_as_set_stores_it(seed: int) -> None:
    """Table.add (a row under an id holding none, as Store.put stores a create) leaves the
    table as Table.set does: two stores run the same creates (new ids and ids deleted before,
    with the key order and an index kept or not), updates, deletes and rolled-back change
    sets, one storing every row with set."""
    rng = random.Random(seed)
    added, plain = Store(), Store()

    def set_instead(self: Table, row_id: str, row: Row,
                    unique: tuple[object, ...] | None = None) -> None:
        self.set(row_id, row, None, unique)

    plain.tables[SUBSCRIPTIONS].add = types.MethodType(  # type: ignore[method-assign]
        set_instead, plain.tables[SUBSCRIPTIONS])
    at = datetime(2026, 3, 1, tzinfo=UTC)
    for step in range(600):
        at += timedelta(seconds=rng.randrange(2))
        roll, fail, draw = rng.random(), rng.random() < 0.1, rng.getrandbits(64)
        for store in (added, plain):
            table = store.tables[SUBSCRIPTIONS]
            pick = random.Random(draw)
            if step % 50 == 7:  # reads now and then: the key order and an index kept
                table.order  # noqa: B018
                table.lookup("_psync_contactid_value", "contact-1")
            try:
                with store.atomic():
                    if roll < 0.5 or not table.rows:
                        row_id = (pick.choice(sorted(table.tombstones))
                                  if table.tombstones and pick.random() < 0.3
                                  else f"{pick.getrandbits(64):016x}")
                        row = _row(row_id, stamp=at, version=store.next_version(), rng=pick)
                        store.put(SUBSCRIPTIONS, row_id, row,
                                  table.unique_key(row) if pick.random() < 0.5 else None)
                    elif roll < 0.75:
                        row_id = pick.choice(sorted(table.rows))
                        store.put(SUBSCRIPTIONS, row_id, dict(
                            table.rows[row_id], psync_status=100000001,
                            versionnumber=store.next_version(), modifiedon=at))
                    else:
                        store.delete(SUBSCRIPTIONS, pick.choice(sorted(table.rows)),
                                     store.next_version())
                    if fail:
                        raise RuntimeError("the change set fails: all of it is undone")
            except RuntimeError:
                pass
        assert _internals(added.tables[SUBSCRIPTIONS]) == _internals(plain.tables[SUBSCRIPTIONS])
    assert added.tables[SUBSCRIPTIONS].deleted  # (ids deleted, some of them made again)
