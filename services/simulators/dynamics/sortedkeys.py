"""An ascending list of distinct keys, cheap to extend at its top: the row store's ordered indexes.

The store's ordered indexes (rows by version, by ``modifiedon``, ids in key order) take one
entry per write, and nearly every entry is the newest: versions only grow, and the clock only
moves forward. A general sorted list pays its full search and bookkeeping for each of those;
this one checks the top first and appends there.

Rules:

1. Keys are kept ascending, in sublists of at most ``2 * LOAD`` keys, with each sublist's
   largest key in ``maxes`` (a sublist is split in two when it grows past that; one left
   small by removals is joined to its neighbour).
2. ``add`` of a key not below the largest appends to the last sublist; any other key is
   inserted in the one sublist whose range holds it.
3. Reads answer as :class:`sortedcontainers.SortedList` does for the same keys:
   ``irange`` (bounds optional, each inclusive or not, forward or reversed), ``bisect_left``,
   ``len`` and iteration. An iterator is valid until the next change, as there.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable, Iterator
from itertools import chain
from typing import Any

LOAD = 1000
_SPLIT = 2 * LOAD
_JOIN = LOAD // 4  # a sublist this small after a removal is joined to its neighbour


class SortedKeys:
    """Distinct comparable keys in ascending order (rules in the module docstring)."""

    __slots__ = ("_len", "_lists", "_maxes")

    def __init__(self, keys: Iterable[Any] = ()) -> None:
        ordered = sorted(keys)
        self._lists: list[list[Any]] = [ordered[i:i + LOAD]
                                        for i in range(0, len(ordered), LOAD)]
        self._maxes: list[Any] = [sub[-1] for sub in self._lists]
        self._len = len(ordered)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Any]:
        return chain.from_iterable(self._lists)

    def add(self, key: Any) -> None:
        maxes, lists = self._maxes, self._lists
        if not maxes:
            lists.append([key])
            maxes.append(key)
            self._len = 1
            return
        if key >= maxes[-1]:  # (rule 2) the newest: on top
            pos = len(maxes) - 1
            sub = lists[pos]
            sub.append(key)
            maxes[pos] = key
        else:
            pos = bisect_right(maxes, key)
            sub = lists[pos]
            insort(sub, key)
        self._len += 1
        if len(sub) > _SPLIT:  # (rule 1)
            self._split(pos)

    def update(self, ordered: list[Any]) -> None:
        """``add`` each of ``ordered`` (ascending, distinct) in turn. When the first is not
        below the largest key, all of them go on top: they are appended a run at a time, each
        run as long as the last sublist takes before add would split it, so the sublists come
        out as adding them one by one leaves them."""
        if not ordered:
            return
        maxes, lists = self._maxes, self._lists
        if maxes and ordered[0] < maxes[-1]:
            for key in ordered:
                self.add(key)
            return
        start = 0
        if not maxes:  # (as add starts an empty index)
            lists.append([ordered[0]])
            maxes.append(ordered[0])
            self._len, start = 1, 1
        while start < len(ordered):
            sub = lists[-1]
            run = ordered[start:start + _SPLIT + 1 - len(sub)]  # (rule 1: split past _SPLIT)
            sub.extend(run)
            maxes[-1] = sub[-1]
            self._len += len(run)
            start += len(run)
            if len(sub) > _SPLIT:
                self._split(len(lists) - 1)

    def _split(self, pos: int) -> None:
        """Cut sublist ``pos`` in two halves."""
        sub = self._lists[pos]
        half = len(sub) >> 1
        self._lists.insert(pos + 1, sub[half:])
        del sub[half:]
        self._maxes.insert(pos, sub[-1])

    def remove(self, key: Any) -> None:
        """Remove ``key``; ValueError if it is not held."""
        maxes, lists = self._maxes, self._lists
        pos = bisect_left(maxes, key)
        if pos == len(maxes):
            raise ValueError(f"{key!r} not in index")
        sub = lists[pos]
        i = bisect_left(sub, key)
        if sub[i] != key:
            raise ValueError(f"{key!r} not in index")
        del sub[i]
        self._len -= 1
        if not sub:
            del lists[pos], maxes[pos]
            return
        if i == len(sub):
            maxes[pos] = sub[-1]
        if len(sub) < _JOIN and len(lists) > 1:  # (rule 1)
            left = pos - 1 if pos == len(lists) - 1 else pos
            joined = lists[left] + lists[left + 1]
            lists[left:left + 2] = [joined]
            maxes[left:left + 2] = [joined[-1]]
            if len(joined) > _SPLIT:
                self._split(left)

    def bisect_left(self, key: Any) -> int:
        """How many keys are below ``key``."""
        maxes, lists = self._maxes, self._lists
        pos = bisect_left(maxes, key)
        if pos == len(maxes):
            return self._len
        return sum(map(len, lists[:pos])) + bisect_left(lists[pos], key)

    def _at(self, key: Any, *, right: bool) -> tuple[int, int]:
        """(sublist, offset) of the first key above ``key`` (``right``) or not below it."""
        search = bisect_right if right else bisect_left
        pos = search(self._maxes, key)
        if pos == len(self._maxes):
            return pos, 0
        return pos, search(self._lists[pos], key)

    def irange(self, minimum: Any = None, maximum: Any = None,
               inclusive: tuple[bool, bool] = (True, True),
               reverse: bool = False) -> Iterator[Any]:
        """The keys between ``minimum`` and ``maximum`` (None: unbounded), ascending or not."""
        lists = self._lists
        start = (0, 0) if minimum is None else self._at(minimum, right=not inclusive[0])
        stop = (len(lists), 0) if maximum is None else self._at(maximum, right=inclusive[1])
        (p0, i0), (p1, i1) = start, stop
        pieces: list[list[Any]]
        if p0 > p1 or p0 == len(lists):
            pieces = []
        elif p0 == p1:
            pieces = [lists[p0][i0:i1]]
        else:
            pieces = [lists[p0][i0:], *lists[p0 + 1:p1]]
            if p1 < len(lists) and i1:
                pieces.append(lists[p1][:i1])
        if reverse:
            return chain.from_iterable(map(reversed, reversed(pieces)))
        return chain.from_iterable(pieces)
