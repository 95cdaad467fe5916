"""A typed face over ``sortedcontainers.SortedList`` holding ``(time, slot)`` keys as one int."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from sortedcontainers import SortedList  # type: ignore[import-untyped]

_SLOT_BITS = 32


def time_key(ms: int, slot: int) -> int:
    """Orders by time, then slot (= contact id order)."""
    return (ms << _SLOT_BITS) | slot


def key_slot(key: int) -> int:
    return key & ((1 << _SLOT_BITS) - 1)


def key_time(key: int) -> int:
    return key >> _SLOT_BITS


class SortedKeys:
    """Sorted ints with logarithmic insert, remove and positional access."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[int] = ()) -> None:
        self._keys = SortedList(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: int) -> None:
        self._keys.add(key)

    def discard(self, key: int) -> None:
        self._keys.discard(key)

    def position(self, key: int) -> int:
        """How many keys are below ``key``."""
        return int(self._keys.bisect_left(key))

    def window(self, start: int, stop: int) -> Iterator[int]:
        """Keys at positions ``start..stop-1``."""
        return iter(self._keys.islice(start, stop))

    def from_key(self, key: int) -> Iterator[int]:
        """Keys ``>= key``, ascending."""
        return iter(self._keys.irange(minimum=key))
