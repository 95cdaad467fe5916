"""Rows of every table, with the indexes that keep reads, deltas and writes fast at scale.

Per table: rows by id, the ids in key order (paging), a version-ordered change index holding
each live row once at its latest version plus one for deleted rows (deltas bisect from a token's
version), hash indexes on lookup and e-mail columns, a ``modifiedon`` index and the alternate
key. Rows are never mutated in place: a write stores a new dict, so a journal of old rows is
enough to roll a change set back.

The ordered indexes are :class:`SortedKeys`, which take the newest entry (a new version, the
clock's second) by appending; the ``modifiedon`` index keeps the entries of the newest second
apart (their ids come in no order) until a newer second or a read.

The key order and the hash indexes are kept only while reads use them:

1. one is built when a read first asks for it (none after a bulk load);
2. writes keep the built ones up to date;
3. one is dropped once the rows written since its last read pass half the table (checked
   every ``_SWEEP_EVERY`` writes). Rebuilding costs about one step per row and keeping one
   step per write, so keeping an index for reads that come rarely costs at most about twice
   what rebuilding would have; the half also holds for a table that only grows, whose writes
   never outnumber its rows. The subscriptions the product writes are looked up by record
   but never by preference, nor paged in key order: their creates now skip those.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

from sortedcontainers import SortedSet  # type: ignore[import-untyped]

from .schema import TABLES, TableSchema
from .sortedkeys import SortedKeys

Row = dict[str, Any]

FIRST_VERSION = 1_000_000
LISTMEMBERS = "listmembers"
_LISTMEMBER_NS = uuid.UUID("0b7f2a44-5d1c-4c6e-8a4f-9e2d51c0a7b3")


def listmember_id(list_id: str, member_id: str) -> str:
    """The id of the ``listmember`` row of one membership (what AddMemberList answers)."""
    return str(uuid.uuid5(_LISTMEMBER_NS, f"{list_id}:{member_id}"))


def listmember_row(list_id: str, member_id: str, entity_type: str, *, at: datetime,
                   version: int) -> Row:
    return {"listmemberid": listmember_id(list_id, member_id), "_listid_value": list_id,
            "_entityid_value": member_id, "entitytype": entity_type, "createdon": at,
            "modifiedon": at, "versionnumber": version}


def index_key(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


class ModifiedIndex:
    """Rows by ``(modifiedon, id)``, each entry one string: the instant, fixed-width, then the id.

    One string per entry rather than a ``(datetime, id)`` tuple: a search in a large index
    touches one object per comparison instead of three, which at a hundred thousand rows is
    most of what an insert costs. The strings order as the tuples do: the instant's part has
    one width, so the first difference within it is the instant's, and equal instants leave
    the ids to decide. Bounds are given as such tuples, an id part of ``""`` sorting below
    every id and ``"\uffff"`` above.

    Writes stamp the clock's second, and within a second their ids come in no order: a
    sorted insert each would move half the newest sublist. So the entries of the newest
    second stamped wait in a set, and join the sorted keys (in order, so each is appended)
    when a newer second is stamped or before a read.
    """

    __slots__ = ("_keys", "_newest", "_pending", "_prefixes")

    def __init__(self, entries: Iterable[tuple[datetime, str]] = ()) -> None:
        self._prefixes: dict[datetime, str] = {}  # the clock's recent seconds, encoded
        self._keys = SortedKeys(self._key(stamp, row_id) for stamp, row_id in entries)
        self._newest = ""  # the encoded instant of the entries in _pending
        self._pending: set[str] = set()

    def _prefix(self, stamp: datetime) -> str:
        prefix = self._prefixes.get(stamp)
        if prefix is None:
            if len(self._prefixes) >= _PREFIXES_KEPT:
                self._prefixes.clear()
            # microseconds since the earliest instant: 18 digits up to the latest one
            prefix = self._prefixes[stamp] = f"{(stamp - _EARLIEST) // _MICROSECOND:018d}"
        return prefix

    def _key(self, stamp: datetime, row_id: str) -> str:
        if not isinstance(row_id, str):  # as comparing it with an id would
            raise TypeError(f"an id must be a string, not {type(row_id).__name__}")
        return self._prefix(stamp) + row_id

    def _settled(self) -> SortedKeys:
        """The sorted keys, the waiting entries among them."""
        keys, pending = self._keys, self._pending
        if pending:
            keys.update(sorted(pending))  # (on top in one go when all are newer, as usual)
            pending.clear()
        return keys

    def __len__(self) -> int:
        return len(self._keys) + len(self._pending)

    def add(self, stamp: datetime, row_id: str) -> None:
        if not isinstance(row_id, str):  # (as _key)
            raise TypeError(f"an id must be a string, not {type(row_id).__name__}")
        # (_prefix's look among the kept ones, inline: a call costs more than the look)
        prefix = self._prefixes.get(stamp) or self._prefix(stamp)
        if prefix == self._newest:
            self._pending.add(prefix + row_id)
        elif prefix > self._newest:  # a newer second: the waiting ones join the rest
            self._settled()
            self._newest = prefix
            self._pending.add(prefix + row_id)
        else:
            self._keys.add(prefix + row_id)

    def remove(self, stamp: datetime, row_id: str) -> None:
        key = self._key(stamp, row_id)
        if key in self._pending:
            self._pending.remove(key)
        else:
            self._keys.remove(key)

    def count(self, lo: tuple[datetime, str], hi: tuple[datetime, str]) -> int:
        """Entries from ``lo`` (inclusive) to ``hi`` (exclusive)."""
        keys = self._settled()
        return keys.bisect_left(self._key(*hi)) - keys.bisect_left(self._key(*lo))

    def ids(self, lo: tuple[datetime, str], hi: tuple[datetime, str], *,
            inclusive: tuple[bool, bool] = (True, True), reverse: bool = False) -> Iterator[str]:
        """The ids of the entries between ``lo`` and ``hi``, by ``(modifiedon, id)``."""
        keys = self._settled().irange(self._key(*lo), self._key(*hi), inclusive=inclusive,
                                      reverse=reverse)
        return (key[_STAMP_WIDTH:] for key in keys)


_EARLIEST = datetime.min.replace(tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_STAMP_WIDTH = 18
_PREFIXES_KEPT = 4096
_KEY_ORDER = ""  # the key order's name among the kept indexes (no column has it)
_SWEEP_EVERY = 256  # writes between looks for indexes to drop


class Table:
    def __init__(self, schema: TableSchema) -> None:
        self.schema = schema
        self.rows: dict[str, Row] = {}
        self._order: SortedKeys | None = None  # ids, key order, while reads use it
        self.changes = SortedKeys()  # (version, id) of live rows
        self.deleted = SortedKeys()  # (version, id) of deleted rows
        self.tombstones: dict[str, int] = {}  # id -> version of its deletion
        self.by_modified = ModifiedIndex()
        # the hash indexes kept (column -> index key -> ids), while reads use them
        self.indexes: dict[str, dict[Any, set[str]]] = {}
        self.unique: dict[tuple[Any, ...], str] = {}
        self._writes = 0  # row changes so far
        # each kept index (_KEY_ORDER: the key order) -> _writes at its last read
        self._read_at: dict[str, int] = {}

    @property
    def order(self) -> SortedKeys:
        """The ids in key order (built now if it is not kept)."""
        order = self._order
        if order is None:
            order = self._order = SortedKeys(self.rows)
        self._read_at[_KEY_ORDER] = self._writes
        return order

    def index(self, column: str) -> dict[Any, set[str]]:
        """The hash index of an indexed ``column`` (built now if it is not kept)."""
        index = self.indexes.get(column)
        if index is None:
            if column not in self.schema.indexed:
                raise KeyError(column)
            index = self.indexes[column] = {}
            for row_id, row in self.rows.items():
                value = row.get(column)
                if value is not None:
                    index.setdefault(index_key(value), set()).add(row_id)
        self._read_at[column] = self._writes
        return index

    def _drop_unread(self) -> None:
        """Drop the indexes no read has used while half the table was written (rule 3)."""
        for name, read_at in list(self._read_at.items()):
            if 2 * (self._writes - read_at) > len(self.rows):
                del self._read_at[name]
                if name == _KEY_ORDER:
                    self._order = None
                else:
                    del self.indexes[name]

    def unique_key(self, row: Row) -> tuple[Any, ...] | None:
        if not self.schema.unique:
            return None
        # unique columns are lookups: GUIDs, stored lower-cased by every write
        return tuple(map(row.get, self.schema.unique))

    def lookup(self, column: str, value: Any) -> set[str]:
        return self.index(column).get(index_key(value), set())

    def _filed_under(self, row: Row) -> Iterator[tuple[dict[Any, set[str]], Any]]:
        """The column indexes a row is filed in, each with the row's key there."""
        for col, index in self.indexes.items():
            value = row.get(col)
            if value is not None:
                yield index, index_key(value)

    def _index(self, row_id: str, row: Row, unique: tuple[Any, ...] | None) -> None:
        self.changes.add((row["versionnumber"], row_id))
        self.by_modified.add(row["modifiedon"], row_id)
        self._index_columns(row_id, row)
        key = self.unique_key(row) if unique is None else unique
        if key is not None:
            self.unique[key] = row_id

    def _index_columns(self, row_id: str, row: Row) -> None:
        """File a new row in the column indexes kept."""
        for col, index in self.indexes.items():  # as _filed_under, inline
            value = row.get(col)
            if value is not None:
                if isinstance(value, str):  # (index_key)
                    value = value.lower()
                ids = index.get(value)
                if ids is None:
                    index[value] = {row_id}
                else:
                    ids.add(row_id)

    def _unindex(self, row_id: str, row: Row) -> None:
        self.changes.remove((row["versionnumber"], row_id))
        self.by_modified.remove(row["modifiedon"], row_id)
        for index, k in self._filed_under(row):
            ids = index[k]
            ids.discard(row_id)
            if not ids:
                del index[k]
        key = self.unique_key(row)
        if key is not None and self.unique.get(key) == row_id:
            del self.unique[key]

    def _refile(self, row_id: str, old: Row, row: Row, unique: tuple[Any, ...] | None) -> None:
        """Move an updated row's index entries: only those whose key changed move (an update
        usually changes one column, and every index move costs a sorted-list edit)."""
        if old["versionnumber"] != row["versionnumber"]:
            self.changes.remove((old["versionnumber"], row_id))
            self.changes.add((row["versionnumber"], row_id))
        if old["modifiedon"] != row["modifiedon"]:
            self.by_modified.remove(old["modifiedon"], row_id)
            self.by_modified.add(row["modifiedon"], row_id)
        for col, index in self.indexes.items():
            before, after = old.get(col), row.get(col)
            if before == after and type(before) is type(after):
                continue  # the same key (index_key of equal values of one type is equal)
            old_key = None if before is None else index_key(before)
            new_key = None if after is None else index_key(after)
            if old_key == new_key:
                continue
            if old_key is not None:
                ids = index[old_key]
                ids.discard(row_id)
                if not ids:
                    del index[old_key]
            if new_key is not None:
                moved = index.get(new_key)
                if moved is None:
                    index[new_key] = {row_id}
                else:
                    moved.add(row_id)
        old_unique = self.unique_key(old)
        new_unique = self.unique_key(row) if unique is None else unique
        if old_unique != new_unique and old_unique is not None \
                and self.unique.get(old_unique) == row_id:
            del self.unique[old_unique]
        if new_unique is not None:
            self.unique[new_unique] = row_id

    def set(self, row_id: str, row: Row | None, tombstone: int | None,
            unique: tuple[Any, ...] | None = None) -> None:
        """Make ``row_id`` hold ``row`` (or nothing) with ``tombstone`` (or none); ``unique``:
        the row's alternate key when the caller has it already (``unique_key(row)``)."""
        self._writes += 1
        if not self._writes % _SWEEP_EVERY:
            self._drop_unread()
        old = self.rows.get(row_id)
        if old is not None and row is not None:
            self._refile(row_id, old, row, unique)
            self.rows[row_id] = row
        elif old is not None:
            self._unindex(row_id, old)
            del self.rows[row_id]
            if self._order is not None:
                self._order.remove(row_id)
        old_tomb = self.tombstones.pop(row_id, None)
        if old_tomb is not None:
            self.deleted.remove((old_tomb, row_id))
        if row is not None and old is None:
            self.rows[row_id] = row
            if self._order is not None:
                self._order.add(row_id)
            self._index(row_id, row, unique)
        if tombstone is not None:
            self.tombstones[row_id] = tombstone
            self.deleted.add((tombstone, row_id))

    def add(self, row_id: str, row: Row, unique: tuple[Any, ...] | None = None) -> None:
        """set of ``row`` under an id holding no row (as a create stores it), without set's
        look for the row it replaces; _index's steps inline (a call costs more than most of
        them)."""
        self._writes += 1
        if not self._writes % _SWEEP_EVERY:
            self._drop_unread()
        if self.tombstones:  # (an id deleted before: its tombstone goes)
            old_tomb = self.tombstones.pop(row_id, None)
            if old_tomb is not None:
                self.deleted.remove((old_tomb, row_id))
        self.rows[row_id] = row
        if self._order is not None:
            self._order.add(row_id)
        self.changes.add((row["versionnumber"], row_id))
        self.by_modified.add(row["modifiedon"], row_id)
        if self.indexes:
            self._index_columns(row_id, row)
        key = self.unique_key(row) if unique is None else unique
        if key is not None:
            self.unique[key] = row_id

    def bulk_load(self, rows: list[Row], tombstones: dict[str, int] | None = None, *,
                  in_order: bool = False) -> None:
        """Replace the contents in one go: build every index once, without per-row overhead.

        ``in_order`` promises that ``rows`` come in key order and that versions and
        ``modifiedon`` never decrease along it (as seeded rows do), which saves the sorting.
        """
        pk = self.schema.pk
        by_id = self.rows = {r[pk]: r for r in rows}
        if in_order:
            ids = [r[pk] for r in rows]
            by_version = by_modified = ids
        else:
            # Sort on simple keys (stable sorts keep key order among ties), so the sorted
            # lists below are built from presorted input instead of comparing tuples.
            ids = sorted(by_id)
            by_version = sorted(ids, key=lambda i: by_id[i]["versionnumber"])
            by_modified = sorted(ids, key=lambda i: by_id[i]["modifiedon"])
        self._order, self.indexes, self._read_at = None, {}, {}
        self.changes = SortedKeys([(by_id[i]["versionnumber"], i) for i in by_version])
        self.by_modified = ModifiedIndex((by_id[i]["modifiedon"], i) for i in by_modified)
        self.tombstones = dict(tombstones or {})
        self.deleted = SortedKeys((v, i) for i, v in self.tombstones.items())
        self.unique = {}
        if self.schema.unique:
            columns = [[r.get(c) for r in rows] for c in self.schema.unique]
            self.unique = dict(zip(zip(*columns, strict=True), (r[pk] for r in rows),
                                   strict=True))


class _Atomic:
    """The context of :meth:`Store.atomic` (a class: a generator-based context manager costs
    more, and a batch enters one per change set)."""

    __slots__ = ("journal", "mark", "outer", "store")

    def __init__(self, store: Store) -> None:
        self.store = store
        self.journal: list[tuple[Any, ...]] = []

    def __enter__(self) -> None:
        store = self.store
        self.outer = store._journal is None
        if self.outer:
            store._journal = []
        journal = store._journal
        assert journal is not None
        self.journal = journal
        self.mark = len(journal)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if kind is not None:
                self.store._undo(self.journal, self.mark)
        finally:
            if self.outer:
                self.store._journal = None


class Store:
    """Every table, list membership, and the one version counter all writes share."""

    def __init__(self) -> None:
        self.tables: dict[str, Table] = {name: Table(schema) for name, schema in TABLES.items()}
        self.version = FIRST_VERSION
        self.members: dict[str, Any] = {}  # list id -> SortedSet of member ids
        self.member_of: dict[str, set[str]] = {}  # member id -> list ids
        self._journal: list[tuple[Any, ...]] | None = None

    def clear(self) -> None:
        """Drop all rows and memberships; the version counter keeps counting up."""
        self.tables = {name: Table(schema) for name, schema in TABLES.items()}
        self.members = {}
        self.member_of = {}

    def next_version(self) -> int:
        self.version += 1
        return self.version

    # -- writes ---------------------------------------------------------------------------------

    def put(self, entity_set: str, row_id: str, row: Row,
            unique: tuple[Any, ...] | None = None) -> None:
        """Store ``row`` as ``row_id`` (``unique``: as :meth:`Table.set` takes it)."""
        table = self.tables[entity_set]
        old = table.rows.get(row_id)
        journal = self._journal
        if journal is not None:  # (as _record, inline: this runs for every row written)
            journal.append(("row", table, row_id, old, table.tombstones.get(row_id)))
        if old is None:
            table.add(row_id, row, unique)
        else:
            table.set(row_id, row, None, unique)

    def put_new(self, table: Table, row_id: str, row: Row,
                unique: tuple[Any, ...] | None) -> None:
        """put of a row under an id holding none in ``table``, its alternate key ``unique``."""
        journal = self._journal
        if journal is not None:  # (as put records it: no row before)
            journal.append(("row", table, row_id, None, table.tombstones.get(row_id)))
        table.add(row_id, row, unique)

    def delete(self, entity_set: str, row_id: str, version: int) -> Row:
        table = self.tables[entity_set]
        old = table.rows[row_id]
        self._record(("row", table, row_id, old, table.tombstones.get(row_id)))
        table.set(row_id, None, version)
        return old

    def is_member(self, list_id: str, member_id: str) -> bool:
        return member_id in self.members.get(list_id, ())

    def add_member(self, list_id: str, member_id: str, row: Row) -> bool:
        """Add a membership with its ``listmember`` row (False: it was one already)."""
        if not self._link(list_id, member_id):
            return False
        self.put(LISTMEMBERS, row["listmemberid"], row)
        return True

    def remove_member(self, list_id: str, member_id: str, version: int) -> bool:
        """Remove a membership and its ``listmember`` row (False: it was none)."""
        if not self._unlink(list_id, member_id):
            return False
        row_id = listmember_id(list_id, member_id)
        if row_id in self.tables[LISTMEMBERS].rows:
            self.delete(LISTMEMBERS, row_id, version)
        return True

    def _link(self, list_id: str, member_id: str) -> bool:
        members = self.members.setdefault(list_id, SortedSet())
        if member_id in members:
            return False
        self._record(("member", list_id, member_id, False))
        members.add(member_id)
        self.member_of.setdefault(member_id, set()).add(list_id)
        return True

    def _unlink(self, list_id: str, member_id: str) -> bool:
        members = self.members.get(list_id)
        if members is None or member_id not in members:
            return False
        self._record(("member", list_id, member_id, True))
        members.discard(member_id)
        lists = self.member_of.get(member_id)
        if lists is not None:
            lists.discard(list_id)
            if not lists:
                del self.member_of[member_id]
        return True

    # -- change sets ----------------------------------------------------------------------------

    def _record(self, entry: tuple[Any, ...]) -> None:
        if self._journal is not None:
            self._journal.append(entry)

    def atomic(self) -> _Atomic:
        """All writes inside succeed together, or are undone if the block raises."""
        return _Atomic(self)

    def _undo(self, journal: list[tuple[Any, ...]], mark: int) -> None:
        saved, self._journal = self._journal, None
        try:
            while len(journal) > mark:
                entry = journal.pop()
                if entry[0] == "row":
                    _, table, row_id, old_row, old_tomb = entry
                    table.set(row_id, old_row, old_tomb)
                else:
                    _, list_id, member_id, was_member = entry
                    if was_member:
                        self._link(list_id, member_id)
                    else:
                        self._unlink(list_id, member_id)
        finally:
            self._journal = saved

    # -- bulk -----------------------------------------------------------------------------------

    def load_members(self, members: dict[str, list[str]]) -> None:
        """Set the memberships (their ``listmember`` rows are loaded as the table's rows)."""
        self.members = {lid: SortedSet(ids) for lid, ids in members.items()}
        self.member_of = {}
        for lid, ids in members.items():
            for mid in ids:
                self.member_of.setdefault(mid, set()).add(lid)
